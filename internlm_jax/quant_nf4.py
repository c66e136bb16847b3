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

NF4 (Dettmers et al., QLoRA): each block of `block` consecutive elements (row-major within one layer, so a scan
over layers slices whole blocks) is divided by its absmax and rounded to the nearest of 16 levels placed at
normal quantiles, asymmetric so that 0 is exact. Error bound per element: absmax(block) * (largest gap between
neighbouring levels) / 2, about 0.152 * absmax. int8: round(w / s) with s = absmax(channel) / 127, error <= s / 2.
Double quantization of the scales (XTuner's QLoRA) is not done: float32 scales cost 4 / block bytes per weight
(0.0625 at block 64; `scale_dtype="bfloat16"` halves it).

`QuantizedWeight.astype(dtype)` dequantizes, which is all model.py asks of a projection weight (see lora.py): a
quantized params tree runs through `model.forward` as is, layer by layer inside the scan, and stays quantized in
memory. Norm weights are never quantized; the embedding only on request (target "embed"): model.py gathers it
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


def _nf4_decode(packed: jax.Array, scales: jax.Array, block: int) -> jax.Array:
  """float32 [..., nb * block] from packed codes [..., nb * block / 2] and their block scales [..., nb]."""
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1, block))
  values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)] * scales.astype(jnp.float32)[..., None]
  return values.reshape(packed.shape[:-1] + (-1,))


def dequantize(q: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """The weight [*lead, *inner_shape] in `dtype` (float32 arithmetic, one cast at the end)."""
  if q.kind == "int8":
    return (q.codes.astype(jnp.float32) * q.scales.astype(jnp.float32)).astype(dtype)
  lead = q.lead
  n = math.prod(q.inner_shape)
  return _nf4_decode(q.codes, q.scales, q.block)[..., :n].reshape(lead + q.inner_shape).astype(dtype)


def _rows_whole_blocks(q: QuantizedWeight) -> bool:
  """True when each row of a 2-D [R, C] NF4 weight is whole blocks (C % block == 0), so rows and column
  ranges can be decoded on their own."""
  return q.kind == "int8" or (len(q.inner_shape) == 2 and not q.lead and q.inner_shape[1] % q.block == 0)


def take_rows(q: QuantizedWeight, index: jax.Array) -> jax.Array:
  """dequantize(q)[index] for a 2-D [R, C] weight (the embedding) without decoding the other rows:
  [*index.shape, C] in the weight's original dtype."""
  R, C = q.inner_shape
  if not _rows_whole_blocks(q):
    return jnp.take(dequantize(q, q.dtype), index, axis=0)
  if q.kind == "int8":
    return (jnp.take(q.codes, index, axis=0).astype(jnp.float32) * q.scales[0].astype(jnp.float32)).astype(q.dtype)
  codes = jnp.take(q.codes.reshape(R, C // 2), index, axis=0)
  scales = jnp.take(q.scales.reshape(R, C // q.block), index, axis=0)
  return _nf4_decode(codes, scales, q.block).astype(q.dtype)


def column_slice(q: QuantizedWeight, start, size: int, dtype=jnp.float32) -> jax.Array:
  """dequantize(q)[:, start:start + size] for a 2-D [R, C] weight (the output head); `start` may be traced.
  NF4 needs C, start and size to be multiples of the block (see `vocab_chunk`)."""
  R, C = q.inner_shape
  if q.kind == "int8":
    codes = jax.lax.dynamic_slice_in_dim(q.codes, start, size, axis=1)
    scales = jax.lax.dynamic_slice_in_dim(q.scales, start, size, axis=1)
    return (codes.astype(jnp.float32) * scales.astype(jnp.float32)).astype(dtype)
  codes = jax.lax.dynamic_slice_in_dim(q.codes.reshape(R, C // 2), start // 2, size // 2, axis=1)
  scales = jax.lax.dynamic_slice_in_dim(q.scales.reshape(R, C // q.block), start // q.block, size // q.block, axis=1)
  return _nf4_decode(codes, scales, q.block).astype(dtype)


def vocab_chunk(q: QuantizedWeight, max_chunk: int = 4096) -> int | None:
  """Columns per chunk for `quantized_head_cross_entropy`: whole NF4 blocks, at most max_chunk (None when the
  columns are not whole blocks, e.g. a vocabulary that is not a multiple of the block)."""
  if len(q.inner_shape) != 2 or q.lead:
    return None
  C = q.inner_shape[1]
  unit = 1 if q.kind == "int8" else q.block
  if C % unit:
    return None
  return min(C, max(unit, max_chunk // unit * unit))


def quantized_head_cross_entropy(x: jax.Array, q: QuantizedWeight, targets: jax.Array, *,
                                 max_chunk: int = 4096) -> jax.Array:
  """Per-token cross-entropy float32 [B, T] of the logits x @ dequantize(q) against targets [B, T], for a frozen
  quantized output head [E, V]: the head is decoded one vocabulary chunk at a time inside a rematerialized scan
  (an online log-sum-exp), so neither the dequantized head nor the [B, T, V] logits ever exist; memory is
  O(B * T * chunk + E * chunk). The last chunk is shifted back to end at V and its columns already seen are
  masked. Gradients flow to x only (the head is frozen)."""
  B, T, E = x.shape
  chunk = vocab_chunk(q, max_chunk)
  if chunk is None:
    raise ValueError(f"head {q} cannot be split into whole blocks; dequantize it instead")
  V = q.inner_shape[1]
  n = -(-V // chunk)
  x2 = x.reshape(B * T, E)
  t2 = targets.reshape(B * T)

  @jax.checkpoint
  def body(carry, i):
    peak, total, target_logit = carry
    first = i * chunk                      # the first column this chunk is responsible for
    start = jnp.minimum(first, V - chunk)  # where it reads from (shifted back for the last chunk)
    logits = jnp.dot(x2, column_slice(q, start, chunk, x.dtype), preferred_element_type=jnp.float32)
    logits = jnp.where(start + jnp.arange(chunk) >= first, logits, -jnp.inf)
    new_peak = jnp.maximum(peak, jax.lax.stop_gradient(jnp.max(logits, axis=-1)))
    total = total * jnp.exp(peak - new_peak) + jnp.sum(jnp.exp(logits - new_peak[:, None]), axis=-1)
    inside = (t2 >= first) & (t2 < start + chunk)
    picked = jnp.take_along_axis(logits, jnp.clip(t2 - start, 0, chunk - 1)[:, None], axis=-1)[:, 0]
    return (new_peak, total, target_logit + jnp.where(inside, picked, 0.0)), None

  init = (jnp.full((B * T,), -jnp.inf, jnp.float32), jnp.zeros((B * T,), jnp.float32),
          jnp.zeros((B * T,), jnp.float32))
  (peak, total, target_logit), _ = jax.lax.scan(body, init, jnp.arange(n))
  return (jnp.log(total) + peak - target_logit).reshape(B, T)


def gather_embedding(params: Params, tokens: jax.Array) -> tuple[Params, jax.Array]:
  """(params, tokens) for `model.forward` / `hidden_states` when the embedding is quantized: the rows of these
  tokens are decoded up front and the tokens renumbered to index them (model.py gathers with jnp.take, which a
  QuantizedWeight cannot serve). Unchanged when the embedding is a plain array."""
  embed = params["embed"]
  if not isinstance(embed, QuantizedWeight):
    return params, tokens
  rows = take_rows(embed, tokens.reshape(-1))
  local = jnp.arange(tokens.size, dtype=tokens.dtype).reshape(tokens.shape)
  return dict(params, embed=rows), local


def error_bound(w: jax.Array, q: QuantizedWeight) -> jax.Array:
  """Elementwise worst-case |w - dequantize(q)| from float32 scales (for tests and reports), shaped like w."""
  if q.kind == "int8":
    return jnp.broadcast_to(q.scales.astype(jnp.float32) / 2, w.shape)
  n = math.prod(q.inner_shape)
  per_block = q.scales.astype(jnp.float32) * NF4_MAX_HALF_GAP
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


def _quantize_one(make, shape, kind, n_lead, n_in, block, scale_dtype) -> QuantizedWeight:
  """quantize(make(index)) one layer (n_lead=1) or one row group (2-D NF4) at a time under lax.map, so only one
  slice of the float weight exists at once; `make(i)` returns slice i (a layer, or a group of rows)."""
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
                    block: int = 64, scale_dtype: str = "float32") -> Params:
  """A params tree whose targeted weights are QuantizedWeight nodes; the rest are untouched.

  Stacked layer weights are quantized one layer at a time (and a 2-D NF4 weight one row group at a time), so
  the float32 working copy is one layer, not the whole stack. Run it under jit (or on sharded params) to
  quantize on device. To never hold the float base at all, build it quantized (`init_quantized_params`) or
  quantize each weight as it is loaded.
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
    node[path[-1]] = _quantize_one(make, w.shape, kind, n_lead, n_in, block, scale_dtype)
  return out


def init_quantized_params(config, key: jax.Array, kind: str = "nf4", *,
                          targets: Sequence[str] = DEFAULT_QUANT_TARGETS, block: int = 64,
                          scale_dtype: str = "float32") -> Params:
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
        out.append(_quantize_one(make, spec.shape, kind, n_lead, chosen[path], block, scale_dtype))
    return jax.tree.unflatten(treedef, out)

  return jax.jit(make_all)(key)


def dequantize_params(params: Params, dtype=None) -> Params:
  """Plain arrays again (each in its original dtype unless `dtype`)."""
  return jax.tree.map(lambda x: dequantize(x, dtype or x.dtype) if isinstance(x, QuantizedWeight) else x, params,
                      is_leaf=lambda x: isinstance(x, QuantizedWeight))


def params_nbytes(params: Params) -> int:
  """Bytes held by a (possibly quantized) params tree."""
  return sum(int(x.size * x.dtype.itemsize) for x in jax.tree.leaves(params))
