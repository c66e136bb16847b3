"""ARC-Easy and ARC-Challenge, zero-shot log-likelihood of each option's text. Set the local AI2 jsonl files:
--config.datasets.arc_e.path=... --config.datasets.arc_c.path=..."""
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({"arc_e": presets.arc(path=""), "arc_c": presets.arc(path="")})
