"""Weight quantization for serving: int8 per output channel, int4 group-wise (symmetric); int8 KV lives in
serve/ (per-token scales, see kernels/paged_attention_reference.quantize_kv).

Shapes: a weight w with contraction (input) axis c of size n, split into n / g groups of g. For per-channel
int8, g = n (one group). The quantized form keeps w's shape with axis c replaced by two axes (n / g, g):
  q      int8 or int4, w.shape with c -> (n / g, g)
  scale  float32,      w.shape with c -> (n / g, 1)      w ~= q * scale

A `QArray` answers `.astype(dtype)` with the dequantized weight, which is the only way model.py and
serve/paged_model.py touch matmul weights, so `forward`, the engine and eval run on quantized params unchanged.
XLA:CPU does not fuse an int8 -> float convert into a dot (measured), so the engine stores each quantized weight
as row blocks dequantized just before their own dot, the float copy staying in cache (serve/paged_model.py);
the GPU and TPU compilers can fuse the convert into the matmul (not measured here). The group axis
is stored counted from the end, so slicing the stacked layer axis (scan, `w[i]`) keeps a valid QArray. The
embedding (a gather of a few rows) and the norms stay in float.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from internlm_jax.config import ModelConfig
from internlm_jax.model import param_specs
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules

# Contraction axis of each matmul weight in model.param_specs (the others are output channels).
_CONTRACTION = {("layers", "wqkv"): 1, ("layers", "wo"): 2, ("layers", "w1"): 1, ("layers", "w3"): 1,
                ("layers", "w2"): 1, ("output",): 0}
_LIMITS = {"int8": (jnp.int8, 127.0), "int4": (jnp.int4, 7.0)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QArray:
  q: jax.Array
  scale: jax.Array
  group_axis: int = dataclasses.field(metadata=dict(static=True))  # negative: the (n / g) axis of q

  @property
  def shape(self) -> tuple[int, ...]:
    s = self.q.shape
    a = self.q.ndim + self.group_axis
    return s[:a] + (s[a] * s[a + 1],) + s[a + 2:]

  @property
  def ndim(self) -> int:
    return self.q.ndim - 1

  def astype(self, dtype) -> jax.Array:
    return (self.q.astype(dtype) * self.scale.astype(dtype)).reshape(self.shape)

  def __getitem__(self, index) -> "QArray":
    if not isinstance(index, int):
      raise TypeError("QArray supports only an integer index of its leading (layer) axis")
    return QArray(self.q[index], self.scale[index], self.group_axis)


def quantize(w: jax.Array, axis: int, mode: str = "int8", group_size: int | None = None) -> QArray:
  """Symmetric quantization of w along contraction `axis`: one scale per output channel and group."""
  if mode not in _LIMITS:
    raise ValueError(f"mode must be one of {sorted(_LIMITS)}, got {mode!r}")
  dtype, limit = _LIMITS[mode]
  axis = axis % w.ndim
  n = w.shape[axis]
  g = n if group_size is None else min(group_size, n)
  if n % g:
    raise ValueError(f"contraction size {n} is not divisible by group_size {g}")
  split = w.shape[:axis] + (n // g, g) + w.shape[axis + 1:]
  x = w.astype(jnp.float32).reshape(split)
  scale = jnp.max(jnp.abs(x), axis=axis + 1, keepdims=True) / limit
  scale = jnp.where(scale == 0.0, 1.0, scale)
  q = jnp.clip(jnp.round(x / scale), -limit, limit).astype(dtype)
  return QArray(q, scale, axis - (w.ndim + 1))  # position of the groups axis in q, from the end


def quantize_params(params: dict[str, Any], mode: str = "int8", group_size: int | None = None) -> dict[str, Any]:
  """Params with every matmul weight quantized: mode "int8" (per channel unless group_size) or "int4"
  (group-wise, group_size default 128, or the whole axis when shorter)."""
  if mode == "int4" and group_size is None:
    group_size = 128
  out = jax.tree.map(lambda x: x, params)  # a new tree; leaves shared until replaced

  for path, axis in _CONTRACTION.items():
    node = out
    for key in path[:-1]:
      node = node[key]
    w = node[path[-1]]
    size = w.shape[axis]
    g = None if group_size is None else _divisor_at_most(size, group_size)
    node[path[-1]] = jax.jit(quantize, static_argnums=(1, 2, 3))(w, axis, mode, g)
  return out


def _divisor_at_most(n: int, g: int) -> int:
  for d in range(min(g, n), 0, -1):
    if n % d == 0:
      return d
  return n


def is_quantized(params) -> bool:
  return any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))


def param_shardings(config: ModelConfig, params, mesh, rules: ShardingRules = DEFAULT_RULES):
  """NamedShardings for (possibly quantized) params: a QArray's q and scale take the weight's logical axes with
  the contraction axis split into (replicated groups, the original axis) (scale: replicated there)."""
  from internlm_jax.model import param_shardings as dense_shardings
  dense = dense_shardings(config, mesh, rules)
  specs = param_specs(config)

  def one(path, x, sharding):
    if not isinstance(x, QArray):
      return sharding
    spec = specs
    for key in path:
      spec = spec[key.key]
    axes = list(spec.logical_axes)
    c = len(axes) + 1 + x.group_axis  # the contraction axis of the dense weight
    q_axes = axes[:c] + [None] + axes[c:]
    scale_axes = axes[:c] + [None, None] + axes[c + 1:]
    return QArray(rules.sharding(mesh, q_axes), rules.sharding(mesh, scale_axes), x.group_axis)

  return jax.tree_util.tree_map_with_path(one, params, dense, is_leaf=lambda x: isinstance(x, QArray))


def nbytes(params) -> int:
  """Device bytes of a params tree (int4 counted as half a byte)."""
  total = 0
  for leaf in jax.tree.leaves(params):
    bits = 4 if leaf.dtype == jnp.int4 else leaf.dtype.itemsize * 8
    total += leaf.size * bits // 8
  return total
