"""GSM8K, 4-shot chain of thought, last-number match (OpenCompass gsm8k_gen). Set the local files:
  --config.datasets.gsm8k.path=DIR/test.jsonl --config.datasets.gsm8k.fewshot_path=DIR/train.jsonl"""
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({"gsm8k": presets.gsm8k(path="", fewshot_path="")})
