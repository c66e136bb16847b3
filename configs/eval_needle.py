"""Needle in a haystack over held-out Shakespeare: lengths x depths grid, heatmap at
DIR/results/<model>/needle_heatmap.png. Lengths are in tokens and must fit the model's context."""
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({"needle": presets.needle(lengths=(1024, 2048, 4096, 8192),
                                                       depths=(0, 10, 21, 31, 42, 52, 63, 73, 84, 94, 100))})
