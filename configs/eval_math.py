"""MATH, 4-shot, last \\boxed{} answer with normalized equivalence. Set the local files (jsonl, or the original
folder of per-problem json files): --config.datasets.math.path=... --config.datasets.math.fewshot_path=..."""
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({"math": presets.math(path="", fewshot_path="")})
