"""The model-card suite (OpenCompass settings for InternLM2 base models): MMLU 5-shot ppl, GSM8K 4-shot gen,
MATH 4-shot gen, HumanEval pass@1, ARC-c. Each dataset needs its local path, e.g.
  --config.datasets.mmlu.path=/data/mmlu --config.datasets.gsm8k.path=/data/gsm8k/test.jsonl
  --config.datasets.gsm8k.fewshot_path=/data/gsm8k/train.jsonl --config.datasets.math.path=/data/math/test.jsonl
  --config.datasets.math.fewshot_path=/data/math/train.jsonl --config.datasets.arc_c.path=/data/arc/ARC-Challenge-Test.jsonl
Chat models: --config.datasets.<name>.template.chat=True per dataset."""
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({
      "mmlu": presets.mmlu(path=""),
      "gsm8k": presets.gsm8k(path="", fewshot_path=""),
      "math": presets.math(path="", fewshot_path=""),
      "humaneval": presets.humaneval_gen(),
      "arc_c": presets.arc(path=""),
  }, batch_size=16, workers=4)
