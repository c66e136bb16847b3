"""A frozen base stored as NF4 (4-bit NormalFloat, block-wise absmax scales) or int8 (per output channel),
dequantized inside the jitted forward: the QLoRA base for fine-tuning.

How this differs from `quant.py` (serving; owned with serve/, deliberately separate):
  quant.py       serving weights: symmetric int8 per output channel or int4 group-wise along the contraction
                 axis (`QArray`, native int4 dtype), plus the int8 KV cache; read by the decode step, where
                 bytes per token dominate. Its embedding stays in float.
  quant_nf4.py   the QLoRA base: NF4 (normal-quantile levels, blocks of consecutive elements, as bitsandbytes /
                 XTuner) or int8; packed uint8 codes; built for training memory: weights can be born quantized
                 (`init_quantized_params`) or quantized one layer at a time, the embedding can be NF4 too (rows
                 decoded per batch, `gather_embedding`) and a quantized output head is read one vocabulary chunk at
                 a time by the loss (`quantized_head_cross_entropy`). Adapters merge into `dequantize_params`.
Both answer `.astype(dtype)` with the dequantized weight, the only way model.py reads a projection weight; the
formats are not interchangeable (a QLoRA export is merged to float first, see finetune/loop.py).

Shapes: lead = (L,) for stacked layer weights, () for the output head; W = [*lead, *in_dims, *out_dims] as in
model.param_specs; n = prod(W.shape[len(lead):]) elements per layer; nb = ceil(n / block) blocks.

  kind   codes                               scales
  nf4    uint8 [*lead, nb * block / 2]       float32 [*lead, nb]         two 4-bit codes per byte (low nibble first)
  int8   int8  [*lead, *in, *out] (= W)      float32 [*lead, 1.., *out]  symmetric, one scale per output channel
  nf4 with double_quant=True: scales int8 [*lead, nb], plus scale2 float32 [*lead, ceil(nb / 256)] and
  offset float32 [*lead]: scale = offset + scales * scale2[block // 256]

NF4 (Dettmers et al., QLoRA): each block of `block` consecutive elements (row-major within one layer, so a scan
over layers slices whole blocks) is divided by its absmax and rounded to the nearest of 16 levels placed at
normal quantiles, asymmetric so that 0 is exact. Error bound per element: absmax(block) * (largest gap between
neighbouring levels) / 2, about 0.152 * absmax. int8: round(w / s) with s = absmax(channel) / 127, error <= s / 2.
Double quantization (QLoRA's, bitsandbytes' bnb_4bit_use_double_quant, XTuner's default): float32 scales cost
4 / block bytes per weight (0.0625 at block 64); the NF4 codes are chosen against the exact absmax, then the absmax
values of each layer are centred on their mean (`offset`) and stored as symmetric int8 in groups of 256 blocks
with one float32 step each (`scale2` = group absmax / 127): 1 / 64 + 4 / 16384 bytes per weight, 0.047 less.
The decoded scale is off by at most scale2 / 2, so the element bound grows to
(scale + scale2 / 2) * 0.152 + scale2 / 2 (`error_bound`). bitsandbytes stores the second level with its
8-bit dynamic code; a linear int8 code per 256 blocks keeps the same layout and cost with a simpler bound.

`QuantizedWeight.astype(dtype)` dequantizes, and `.project(spec, x, dtype)` (what layers.project calls) computes
the projection with a backward that decodes the weight again instead of keeping the float copy alive
(quant_nf4_ops): a quantized params tree runs through `model.forward` as is, layer by layer inside the scan, and
stays quantized in memory. Embedding rows, head chunks and the head's fused loss live in quant_nf4_ops (re-exported
here). Norm weights are never quantized; the embedding only on request (target "embed"): model.py gathers it
with jnp.take, so callers decode the batch's rows first (`gather_embedding`; finetune_step, dpo and the
fine-tuning evaluation do).
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
DOUBLE_QUANT_BLOCK = 256  # NF4 blocks per float32 second-level scale (bitsandbytes' value)


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
  """Quantized weight: leaves codes, scales and (double quantization only) scale2, offset; static kind, per-layer
  shape, block and original dtype."""

  def __init__(self, codes, scales, kind: str, inner_shape: tuple[int, ...], block: int, dtype: str,
               scale2=None, offset=None):
    self.codes, self.scales, self.scale2, self.offset = codes, scales, scale2, offset
    self.kind, self.inner_shape, self.block, self.orig_dtype = kind, tuple(inner_shape), int(block), dtype

  def tree_flatten(self):
    return (self.codes, self.scales, self.scale2, self.offset), (self.kind, self.inner_shape, self.block,
                                                                 self.orig_dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    codes, scales, scale2, offset = children
    return cls(codes, scales, *aux, scale2=scale2, offset=offset)

  @property
  def double_quant(self) -> bool:
    return self.scale2 is not None

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
    return sum(int(x.size * x.dtype.itemsize) for x in jax.tree.leaves(self))

  def astype(self, dtype):
    return dequantize(self, dtype)

  def project(self, spec: str, x: jax.Array, dtype) -> jax.Array:
    """einsum(spec, x, dequantize(self)); its backward decodes again rather than saving the float weight."""
    from internlm_jax.quant_nf4_ops import quantized_einsum  # noqa: PLC0415  (that module imports this one)
    return quantized_einsum(spec, x, self, jnp.dtype(dtype))

  def __repr__(self):
    dq = ", double_quant" if self.double_quant else ""
    return f"QuantizedWeight({self.kind}, shape={self.shape}, block={self.block}{dq})"


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"quantization kind must be one of {KINDS}, got {kind!r}")


def quantize(w: jax.Array, kind: str = "nf4", *, n_lead: int = 0, n_in: int = 1, block: int = 64,
             scale_dtype: str = "float32", double_quant: bool = False) -> QuantizedWeight:
  """Quantizes W [*lead, *in, *out]; `n_lead` leading dims (the layer axis) are kept apart, `n_in` are inputs.
  `double_quant` (NF4 only) stores the block scales as int8 (see `double_quantize`)."""
  if double_quant:
    return double_quantize(quantize(w, kind, n_lead=n_lead, n_in=n_in, block=block))
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


def nf4_decode(packed: jax.Array, scales: jax.Array, block: int, levels: jax.Array | None = None) -> jax.Array:
  """float32 [..., nb * block] from packed codes [..., nb * block / 2] and their block scales [..., nb].
  `levels` (default NF4_LEVELS) may be a traced copy of the table, to tie the decode to another value."""
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1, block))
  table = jnp.asarray(NF4_LEVELS) if levels is None else levels
  values = table[codes.astype(jnp.int32)] * scales.astype(jnp.float32)[..., None]
  return values.reshape(packed.shape[:-1] + (-1,))


def double_quantize(q: QuantizedWeight, group: int = DOUBLE_QUANT_BLOCK) -> QuantizedWeight:
  """The same NF4 weight with its float scales stored as int8 around their per-layer mean, one float32 step per
  `group` blocks (see the module doc); the codes are untouched."""
  if q.kind != "nf4":
    raise ValueError(f"double quantization applies to NF4 block scales, not {q.kind}")
  if q.double_quant:
    return q
  s = q.scales.astype(jnp.float32)  # [*lead, nb]
  nb = s.shape[-1]
  n2 = -(-nb // group)
  offset = jnp.mean(s, axis=-1)
  centred = jnp.pad(s - offset[..., None], [(0, 0)] * (s.ndim - 1) + [(0, n2 * group - nb)])
  centred = centred.reshape(s.shape[:-1] + (n2, group))
  amax = jnp.max(jnp.abs(centred), axis=-1)
  step = jnp.where(amax > 0, amax / 127.0, 1.0)
  codes = jnp.clip(jnp.round(centred / step[..., None]), -127, 127).astype(jnp.int8)
  codes = codes.reshape(s.shape[:-1] + (n2 * group,))[..., :nb]
  return QuantizedWeight(q.codes, codes, q.kind, q.inner_shape, q.block, q.orig_dtype, scale2=step, offset=offset)


def decode_scales(q: QuantizedWeight, blocks: jax.Array | None = None) -> jax.Array:
  """float32 NF4 block scales: all of them [*lead, nb], or those at flat block indices `blocks` (any shape; a
  weight without a lead axis) for decoding some rows or columns alone."""
  if blocks is None:
    if not q.double_quant:
      return q.scales.astype(jnp.float32)
    group = jnp.arange(q.scales.shape[-1]) // DOUBLE_QUANT_BLOCK
    return q.scales.astype(jnp.float32) * jnp.take(q.scale2, group, axis=-1) + q.offset[..., None]
  if q.lead:
    raise ValueError(f"scales by block index need a weight without a lead axis, got {q}")
  picked = jnp.take(q.scales.reshape(-1), blocks).astype(jnp.float32)
  if not q.double_quant:
    return picked
  return picked * jnp.take(q.scale2, blocks // DOUBLE_QUANT_BLOCK) + q.offset


def dequantize(q: QuantizedWeight, dtype=jnp.float32, levels: jax.Array | None = None) -> jax.Array:
  """The weight [*lead, *inner_shape] in `dtype` (float32 arithmetic, one cast at the end); `levels` as in
  nf4_decode."""
  if q.kind == "int8":
    return (q.codes.astype(jnp.float32) * q.scales.astype(jnp.float32)).astype(dtype)
  lead = q.lead
  n = math.prod(q.inner_shape)
  values = nf4_decode(q.codes, decode_scales(q), q.block, levels)
  return values[..., :n].reshape(lead + q.inner_shape).astype(dtype)


def error_bound(w: jax.Array, q: QuantizedWeight) -> jax.Array:
  """Elementwise worst-case |w - dequantize(q)| from the stored scales (for tests and reports), shaped like w.
  With double quantization the decoded scale is off by up to half a second-level step (see the module doc)."""
  if q.kind == "int8":
    return jnp.broadcast_to(q.scales.astype(jnp.float32) / 2, w.shape)
  n = math.prod(q.inner_shape)
  per_block = decode_scales(q) * NF4_MAX_HALF_GAP
  if q.double_quant:
    half_step = jnp.take(q.scale2, jnp.arange(q.scales.shape[-1]) // DOUBLE_QUANT_BLOCK, axis=-1) / 2
    per_block = (decode_scales(q) + half_step) * NF4_MAX_HALF_GAP + half_step
  per_elem = jnp.repeat(per_block, q.block, axis=-1)[..., :n]
  return per_elem.reshape(w.shape)


# name -> (path in the params tree, input dims after the layer axis): LoRA's projections plus the embedding.
QUANT_TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "embed": (("embed",), 1), **{name: (t[0], t[1]) for name, t in TARGETS.items()}}


def _row_groups(shape: tuple[int, ...], kind: str, block: int, max_elems: int = 1 << 22) -> int:
  """How many row groups a 2-D NF4 weight can be quantized in, one at a time, with the same codes as in one
  piece (each group whole blocks); 1 for int8 (its scales span all rows) and for small weights."""
  if kind != "nf4" or len(shape) != 2:
    return 1
  R, C = shape
  for g in range(max(1, -(-R * C // max_elems)), R + 1):
    if R % g == 0 and (R // g * C) % block == 0:
      return g
  return 1


def _quantize_one(make, shape, kind, n_lead, n_in, block, scale_dtype, double_quant=False) -> QuantizedWeight:
  """quantize(make(index)) one layer (n_lead=1) or one row group (2-D NF4) at a time under lax.map, so only one
  slice of the float weight exists at once; `make(i)` returns slice i (a layer, or a group of rows). The scales
  are double-quantized afterwards, per layer, over the whole weight (they are 1 / block of its size)."""
  if double_quant and kind == "nf4":
    return double_quantize(_quantize_one(make, shape, kind, n_lead, n_in, block, "float32"))
  if n_lead == 1:
    return jax.lax.map(lambda i: quantize(make(i), kind, n_in=n_in, block=block, scale_dtype=scale_dtype),
                       jnp.arange(shape[0]))
  groups = _row_groups(shape, kind, block)
  if groups == 1:
    return quantize(make(None), kind, n_in=n_in, block=block, scale_dtype=scale_dtype)
  part = jax.lax.map(lambda i: quantize(make(i), kind, n_in=n_in, block=block, scale_dtype=scale_dtype),
                     jnp.arange(groups))
  return QuantizedWeight(part.codes.reshape(-1), part.scales.reshape(-1), kind, shape, block, part.orig_dtype)


def _resolve(targets: Sequence[str]) -> list[str]:
  unknown = [t for t in targets if t not in QUANT_TARGETS]
  if unknown:
    raise ValueError(f"quantization targets must be from {sorted(QUANT_TARGETS)}, got {unknown}")
  return list(targets)


def quantize_params(params: Params, kind: str = "nf4", *, targets: Sequence[str] = DEFAULT_QUANT_TARGETS,
                    block: int = 64, scale_dtype: str = "float32", double_quant: bool = False) -> Params:
  """A params tree whose targeted weights are QuantizedWeight nodes; the rest are untouched.

  Stacked layer weights are quantized one layer at a time (and a 2-D NF4 weight one row group at a time), so
  the float32 working copy is one layer, not the whole stack. Run it under jit (or on sharded params) to
  quantize on device. To never hold the float base at all, build it quantized (`init_quantized_params`) or
  quantize each weight as it is loaded. `double_quant` stores NF4 block scales as int8 (QLoRA's double
  quantization, XTuner's default; ignored for int8).
  """
  _check_kind(kind)
  out = dict(params)
  for name in _resolve(targets):
    path, n_in = QUANT_TARGETS[name]
    node = out
    for k in path[:-1]:
      node[k] = dict(node[k])
      node = node[k]
    w = node[path[-1]]
    n_lead = 1 if path[0] == "layers" else 0
    groups = 1 if n_lead else _row_groups(w.shape, kind, block)
    if n_lead:
      make = lambda i, w=w: w[i]
    else:
      make = lambda i, w=w, g=groups: w if i is None else jax.lax.dynamic_slice_in_dim(
          w, i * (w.shape[0] // g), w.shape[0] // g)
    node[path[-1]] = _quantize_one(make, w.shape, kind, n_lead, n_in, block, scale_dtype, double_quant)
  return out


def init_quantized_params(config, key: jax.Array, kind: str = "nf4", *,
                          targets: Sequence[str] = DEFAULT_QUANT_TARGETS, block: int = 64,
                          scale_dtype: str = "float32", double_quant: bool = False) -> Params:
  """Random params like `model.init_params` (N(0, initializer_range), ones for norms) with the targeted weights
  born quantized: each is generated and quantized one layer (or row group) at a time inside one jit, so the
  float weights never exist whole. For benchmarks and tests of QLoRA memory at sizes where the float base
  would not fit."""
  from internlm_jax.model import ParamSpec, param_specs  # noqa: PLC0415  (model imports nothing from here)
  _check_kind(kind)
  specs = param_specs(config)
  dtype = jnp.dtype(config.param_dtype)
  chosen = {QUANT_TARGETS[t][0]: QUANT_TARGETS[t][1] for t in _resolve(targets)}
  flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))

  def make_all(key):
    out = []
    for k, (path, spec) in zip(jax.random.split(key, len(flat)), flat):
      path = tuple(p.key for p in path)
      normal = lambda k, shape: (config.initializer_range * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
      if spec.init == "ones":
        out.append(jnp.ones(spec.shape, dtype))
      elif path not in chosen:
        out.append(normal(k, spec.shape))
      else:
        n_lead = 1 if path[0] == "layers" else 0
        groups = 1 if n_lead else _row_groups(spec.shape, kind, block)
        if n_lead:
          make = lambda i, k=k, s=spec.shape: normal(jax.random.fold_in(k, i), s[1:])
        else:
          rows = spec.shape[0] // groups
          make = lambda i, k=k, s=spec.shape, r=rows: normal(k if i is None else jax.random.fold_in(k, i),
                                                             s if i is None else (r,) + s[1:])
        out.append(_quantize_one(make, spec.shape, kind, n_lead, chosen[path], block, scale_dtype,
                                 double_quant))
    return jax.tree.unflatten(treedef, out)

  return jax.jit(make_all)(key)


def dequantize_params(params: Params, dtype=None) -> Params:
  """Plain arrays again (each in its original dtype unless `dtype`)."""
  return jax.tree.map(lambda x: dequantize(x, dtype or x.dtype) if isinstance(x, QuantizedWeight) else x, params,
                      is_leaf=lambda x: isinstance(x, QuantizedWeight))


def params_nbytes(params: Params) -> int:
  """Bytes held by a (possibly quantized) params tree."""
  return sum(int(x.size * x.dtype.itemsize) for x in jax.tree.leaves(params))


_OPS = ("take_rows", "gather_embedding", "column_slice", "vocab_chunk", "quantized_head_cross_entropy",
        "quantized_einsum")


def __getattr__(name):
  # The computing helpers moved to quant_nf4_ops (which imports this module); old imports keep working.
  if name in _OPS:
    from internlm_jax import quant_nf4_ops  # noqa: PLC0415
    return getattr(quant_nf4_ops, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
