"""A frozen base stored as NF4 (4-bit NormalFloat, block-wise absmax scales) or int8 (per output channel),
dequantized inside the jitted forward: the QLoRA base. (Serving quantization lives in `quant.py`.)

Shapes: lead = (L,) for stacked layer weights, () for the output head; W = [*lead, *in_dims, *out_dims] as in
model.param_specs; n = prod(W.shape[len(lead):]) elements per layer; nb = ceil(n / block) blocks.

  kind   codes                               scales
  nf4    uint8 [*lead, nb * block / 2]       float32 [*lead, nb]         two 4-bit codes per byte (low nibble first)
  int8   int8  [*lead, *in, *out] (= W)      float32 [*lead, 1.., *out]  symmetric, one scale per output channel

NF4 (Dettmers et al., QLoRA): each block of `block` consecutive elements (row-major within one layer, so a scan
over layers slices whole blocks) is divided by its absmax and rounded to the nearest of 16 levels placed at
normal quantiles, asymmetric so that 0 is exact. Error bound per element: absmax(block) * (largest gap between
neighbouring levels) / 2, about 0.152 * absmax. int8: round(w / s) with s = absmax(channel) / 127, error <= s / 2.
Double quantization of the scales (XTuner's QLoRA) is not done: float32 scales cost 4 / block bytes per weight
(0.0625 at block 64; `scale_dtype="bfloat16"` halves it).

`QuantizedWeight.astype(dtype)` dequantizes, which is all model.py asks of a projection weight (see lora.py): a
quantized params tree runs through `model.forward` as is, layer by layer inside the scan, and stays quantized in
memory. Embedding and norm weights are never quantized (the embedding is gathered, not multiplied).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.lora import TARGETS

Params = dict[str, Any]
KINDS = ("nf4", "int8")
# bitsandbytes' QLoRA also leaves the output head in full precision.
DEFAULT_QUANT_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")


def _nf4_levels() -> np.ndarray:
  """The 16 NF4 levels: 8 positive and 7 negative normal quantiles (plus 0), scaled into [-1, 1].

  Quantiles are taken evenly in p from 0.5 out to p = 0.9677083 (p = 1 would be infinite), 9 points on the
  positive side and 8 on the negative, sharing 0; this gives the standard table (-1, -0.6962, ..., 0.7230, 1).
  """
  normal, edge = NormalDist(), 0.9677083
  positive = [normal.inv_cdf(p) for p in np.linspace(edge, 0.5, 9)[:-1]]
  negative = [-normal.inv_cdf(p) for p in np.linspace(edge, 0.5, 8)[:-1]]
  levels = np.array(sorted(positive + negative + [0.0]), np.float64)
  return (levels / np.abs(levels).max()).astype(np.float32)


NF4_LEVELS = _nf4_levels()
NF4_MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)


@jax.tree_util.register_pytree_node_class
class QuantizedWeight:
  """Quantized weight: leaves codes and scales; static kind, per-layer shape, block and original dtype."""

  def __init__(self, codes, scales, kind: str, inner_shape: tuple[int, ...], block: int, dtype: str):
    self.codes, self.scales = codes, scales
    self.kind, self.inner_shape, self.block, self.orig_dtype = kind, tuple(inner_shape), int(block), dtype

  def tree_flatten(self):
    return (self.codes, self.scales), (self.kind, self.inner_shape, self.block, self.orig_dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def lead(self) -> tuple[int, ...]:
    # codes/scales may have been sliced by a scan; the per-layer part of their shape is fixed.
    return tuple(self.scales.shape[:self.scales.ndim - (1 if self.kind == "nf4" else len(self.inner_shape))])

  @property
  def shape(self) -> tuple[int, ...]:
    return self.lead + self.inner_shape

  @property
  def dtype(self):
    return jnp.dtype(self.orig_dtype)

  @property
  def nbytes(self) -> int:
    return int(self.codes.size * self.codes.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)

  def astype(self, dtype):
    return dequantize(self, dtype)

  def __repr__(self):
    return f"QuantizedWeight({self.kind}, shape={self.shape}, block={self.block})"


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"quantization kind must be one of {KINDS}, got {kind!r}")


def quantize(w: jax.Array, kind: str = "nf4", *, n_lead: int = 0, n_in: int = 1, block: int = 64,
             scale_dtype: str = "float32") -> QuantizedWeight:
  """Quantizes W [*lead, *in, *out]; `n_lead` leading dims (the layer axis) are kept apart, `n_in` are inputs."""
  _check_kind(kind)
  if w.ndim <= n_lead + n_in:
    raise ValueError(f"weight of shape {w.shape} has no output dims after {n_lead} lead and {n_in} input dims")
  lead, inner = tuple(w.shape[:n_lead]), tuple(w.shape[n_lead:])
  x = w.astype(jnp.float32)
  if kind == "int8":
    axes = tuple(range(n_lead, n_lead + n_in))
    scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0).astype(scale_dtype)
    codes = jnp.clip(jnp.round(x / scale.astype(jnp.float32)), -127, 127).astype(jnp.int8)
    return QuantizedWeight(codes, scale, kind, inner, 0, jnp.dtype(w.dtype).name)
  if block % 2:
    raise ValueError(f"NF4 block size must be even (two codes per byte), got {block}")
  n = math.prod(inner)
  nb = -(-n // block)
  flat = jnp.pad(x.reshape(lead + (n,)), [(0, 0)] * n_lead + [(0, nb * block - n)]).reshape(lead + (nb, block))
  absmax = jnp.max(jnp.abs(flat), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax, 1.0).astype(scale_dtype)
  normalized = flat / scale.astype(jnp.float32)
  # Nearest level: levels are sorted, so compare against the midpoints between neighbours.
  midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
  codes = jnp.searchsorted(midpoints, normalized.reshape(lead + (nb * block,))).astype(jnp.uint8)
  packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
  return QuantizedWeight(packed, scale[..., 0], kind, inner, block, jnp.dtype(w.dtype).name)


def dequantize(q: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """The weight [*lead, *inner_shape] in `dtype` (float32 arithmetic, one cast at the end)."""
  if q.kind == "int8":
    return (q.codes.astype(jnp.float32) * q.scales.astype(jnp.float32)).astype(dtype)
  lead = q.lead
  low, high = q.codes & 0xF, q.codes >> 4
  codes = jnp.stack([low, high], axis=-1).reshape(lead + (-1, q.block))
  values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)] * q.scales.astype(jnp.float32)[..., None]
  n = math.prod(q.inner_shape)
  return values.reshape(lead + (-1,))[..., :n].reshape(lead + q.inner_shape).astype(dtype)


def error_bound(w: jax.Array, q: QuantizedWeight) -> jax.Array:
  """Elementwise worst-case |w - dequantize(q)| from float32 scales (for tests and reports), shaped like w."""
  if q.kind == "int8":
    return jnp.broadcast_to(q.scales.astype(jnp.float32) / 2, w.shape)
  n = math.prod(q.inner_shape)
  per_block = q.scales.astype(jnp.float32) * NF4_MAX_HALF_GAP
  per_elem = jnp.repeat(per_block, q.block, axis=-1)[..., :n]
  return per_elem.reshape(w.shape)


def quantize_params(params: Params, kind: str = "nf4", *, targets: Sequence[str] = DEFAULT_QUANT_TARGETS,
                    block: int = 64, scale_dtype: str = "float32") -> Params:
  """A params tree whose targeted projection weights are QuantizedWeight nodes; the rest are untouched.

  Run it under jit (or on sharded params) to quantize on device; use `jax.jit(..., donate_argnums=0)` to drop
  the float weights as soon as they are quantized.
  """
  _check_kind(kind)
  unknown = [t for t in targets if t not in TARGETS]
  if unknown:
    raise ValueError(f"quantization targets must be from {sorted(TARGETS)}, got {unknown}")
  out = dict(params)
  for name in targets:
    path, n_in, _, _ = TARGETS[name]
    node = out
    for k in path[:-1]:
      node[k] = dict(node[k])
      node = node[k]
    node[path[-1]] = quantize(node[path[-1]], kind, n_lead=1 if path[0] == "layers" else 0, n_in=n_in,
                              block=block, scale_dtype=scale_dtype)
  return out


def dequantize_params(params: Params, dtype=None) -> Params:
  """Plain arrays again (each in its original dtype unless `dtype`)."""
  return jax.tree.map(lambda x: dequantize(x, dtype or x.dtype) if isinstance(x, QuantizedWeight) else x, params,
                      is_leaf=lambda x: isinstance(x, QuantizedWeight))


def params_nbytes(params: Params) -> int:
  """Bytes held by a (possibly quantized) params tree."""
  return sum(int(x.size * x.dtype.itemsize) for x in jax.tree.leaves(params))
