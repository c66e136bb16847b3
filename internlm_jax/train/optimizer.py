"""AdamW with linear warmup and cosine decay, global-norm clipping, and weight decay masked off the norms.

`moments="int8"` keeps the AdamW moments block-wise quantized to 8 bits (train/adam8bit.py): about 2 bytes per
trained parameter instead of 8; the default "float32" is optax.adamw unchanged."""
from __future__ import annotations

import dataclasses

import jax
import optax

from internlm_jax.train.adam8bit import adamw_8bit

MOMENTS = ("float32", "int8")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  min_lr_ratio: float = 0.1  # final lr = learning_rate * min_lr_ratio
  warmup_steps: int = 100
  total_steps: int = 1000
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0  # 0 disables clipping
  moments: str = "float32"  # "int8": block-wise 8-bit AdamW moments (bitsandbytes' AdamW8bit), see adam8bit.py

  def __post_init__(self):
    if self.moments not in MOMENTS:
      raise ValueError(f"optimizer moments must be one of {MOMENTS}, got {self.moments!r}")
    if self.total_steps <= 0 or self.warmup_steps < 0:
      raise ValueError(f"optimizer needs total_steps > 0 and warmup_steps >= 0, got {self.total_steps}, "
                       f"{self.warmup_steps}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, cfg.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params):
  """True for weights that take weight decay: every matrix; norms (vectors and stacked [L, E] scales) do not."""
  def keep(path, _):
    name = jax.tree_util.keystr(path)
    return "norm" not in name
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  adamw = adamw_8bit if cfg.moments == "int8" else optax.adamw
  parts.append(adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
