"""MMLU, 5-shot per subject from dev/, ppl over the option letters (OpenCompass mmlu_ppl). Set the data folder
(with dev/ and test/ csv files): --config.datasets.mmlu.path=DIR"""
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({"mmlu": presets.mmlu(path="")})
