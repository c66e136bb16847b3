"""A quick CPU evaluation of a small checkpoint: held-out Shakespeare perplexity, a short needle grid and a few
HumanEval problems (programs run in the sandbox). Minutes on CPU with the `small` preset."""
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({
      "shakespeare": presets.shakespeare_ppl(limit=16),
      "needle": presets.needle(lengths=(256, 512), depths=(0, 50, 100)),
      "humaneval": presets.humaneval_gen(limit=4),
  }, batch_size=8, workers=2)
