"""Computing with a frozen quantized base (quant_nf4.QuantizedWeight) without keeping dequantized copies alive.

Shapes: N = B * T tokens, E embed, V vocab, C vocabulary columns per chunk; a projection is einsum(spec, x, W)
with W [*in_dims, *out_dims] as in model.param_specs (one layer: a layer scan has sliced the lead axis away).

  quantized_einsum(spec, x, q, dtype)          einsum(spec, x, dequantize(q)); gradient to x only
  take_rows(q, index) / gather_embedding       embedding rows decoded alone (the NF4 embedding)
  column_slice(q, start, C) / vocab_chunk      a column range of the head decoded alone
  quantized_head_cross_entropy(x, q, targets)  head + cross-entropy one vocabulary chunk at a time; gradient to x

Why custom VJPs. Autodiff of `x @ dequantize(q)` keeps the dequantized weight (float32, 4 / 0.53 = 7.5x the NF4
bytes) as a residual from the forward to the backward; under full remat the recomputed forward's copy and the
backward's use are CSE'd into one buffer that lives across the whole backward of the layer. Here the residual is
the quantized weight itself (an input: no new bytes), and the backward decodes it again, after the cotangent
exists (a data dependency on it, `_decode_after`, so XLA can neither hoist nor CSE the second decode). The
frozen base gets zero cotangents; no weight-sized gradient is built.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.quant_nf4 import NF4_LEVELS, QuantizedWeight, decode_scales, dequantize, nf4_decode

Params = dict[str, Any]
DECODE_GROUP_ELEMS = 1 << 17  # float elements of a weight group decoded at a time (0.5 MiB in float32)


def _zero_cotangent(q: QuantizedWeight) -> QuantizedWeight:
  """Zeros for the frozen base: float0 for integer leaves (codes), as JAX requires."""
  def zero(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      return np.zeros(leaf.shape, jax.dtypes.float0)
    return jnp.zeros_like(leaf)
  return jax.tree.map(zero, q)


def _decode_after(q: QuantizedWeight, v: jax.Array) -> tuple[QuantizedWeight, jax.Array]:
  """(q, NF4 level table) with a data dependency on v (the projection's input in the forward, its cotangent in the
  backward), so that decoding with them cannot start before v exists, nor be CSE'd with another decode of q.
  An optimization_barrier is not enough: XLA:CPU drops barriers before scheduling, and then decoded every weight
  of a layer at the start of the layer (measured: wqkv, wo, w1, w3 at once). The tie is v[0] * 0 added to the
  16 levels (int8: to the scales): exact for finite v (a non-finite value makes the step non-finite anyway, and
  such steps are skipped); XLA does not fold x * 0 for floats. Tying the scales alone is not enough: the level
  lookup (a gather over every code) was then shared between the forward's and the backward's decode."""
  tie = jax.lax.stop_gradient(v.reshape(-1)[0]).astype(jnp.float32) * 0.0
  if q.kind == "int8":
    q = QuantizedWeight(q.codes, q.scales + tie.astype(q.scales.dtype), q.kind, q.inner_shape, q.block,
                        q.orig_dtype)
  return q, jnp.asarray(NF4_LEVELS) + tie


def _transposed_spec(spec: str) -> str:
  """'x,w->y' -> 'y,w->x': the input gradient of a projection (every index of x is in y or w)."""
  ins, out = spec.split("->")
  x_spec, w_spec = ins.split(",")
  return f"{out},{w_spec}->{x_spec}"


def _n_in(spec: str) -> int | None:
  """Input dims of the weight when spec is a projection 'batch + in, in + out -> batch + out' (every einsum of
  model.py), else None."""
  ins, out = spec.split("->")
  x_spec, w_spec = ins.split(",")
  n_in = sum(c in x_spec for c in w_spec)
  if not n_in or not x_spec.endswith(w_spec[:n_in]) or out != x_spec[:len(x_spec) - n_in] + w_spec[n_in:]:
    return None
  return n_in


def _groups(q: QuantizedWeight, n_in: int | None, rows: bool) -> int:
  """How many groups of rows (backward) or columns (forward) of W viewed [I, O] are decoded one at a time: each
  group whole NF4 blocks and at most DECODE_GROUP_ELEMS elements when possible, else as small as whole blocks
  allow (1: decode it whole)."""
  if n_in is None or q.kind != "nf4" or q.lead:
    return 1
  I, O = math.prod(q.inner_shape[:n_in]), math.prod(q.inner_shape[n_in:])
  n, fewest = (I if rows else O), max(1, -(-I * O // DECODE_GROUP_ELEMS))
  for k in [*range(fewest, n + 1), *range(fewest - 1, 1, -1)]:  # else the smallest groups that are whole blocks
    if n % k == 0 and ((n // k) * (O if rows else 1)) % q.block == 0:
      return k
  return 1


def _decode_rows(q: QuantizedWeight, index, rows: int, O: int, dtype, levels) -> jax.Array:
  """Rows [index * rows, (index + 1) * rows) of W viewed [I, O], as [rows, O] in dtype (whole blocks)."""
  n = rows * O
  codes = jax.lax.dynamic_slice_in_dim(q.codes, index * (n // 2), n // 2)
  blocks = index * (n // q.block) + jnp.arange(n // q.block)
  return nf4_decode(codes, decode_scales(q, blocks), q.block, levels).reshape(rows, O).astype(dtype)


def _decode_columns(q: QuantizedWeight, start, size: int, I: int, O: int, dtype, levels) -> jax.Array:
  """Columns [start, start + size) of W viewed [I, O] (NF4, O, start and size whole blocks): [I, size]."""
  codes = jax.lax.dynamic_slice_in_dim(q.codes.reshape(I, O // 2), start // 2, size // 2, axis=1)
  per_row, n = O // q.block, size // q.block
  blocks = jnp.arange(I)[:, None] * per_row + start // q.block + jnp.arange(n)[None, :]  # [I, size / block]
  return nf4_decode(codes, decode_scales(q, blocks), q.block, levels).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def quantized_einsum(spec: str, x: jax.Array, q: QuantizedWeight, dtype) -> jax.Array:
  """einsum(spec, x, dequantize(q, dtype)) for one projection. A large NF4 weight is decoded a group of output
  columns at a time (each output column is the same dot product: the result is that of the einsum), so the
  forward never holds a whole float weight either; the backward re-decodes q (see the module doc)."""
  late, levels = _decode_after(q, x)
  n_in = _n_in(spec)
  k = _groups(q, n_in, rows=False)
  if k == 1:
    return jnp.einsum(spec, x, dequantize(late, dtype, levels))
  I, O = math.prod(q.inner_shape[:n_in]), math.prod(q.inner_shape[n_in:])
  x2 = x.reshape(-1, I)
  parts = jax.lax.map(lambda j: jnp.dot(x2, _decode_columns(late, j * (O // k), O // k, I, O, dtype, levels)),
                      jnp.arange(k))  # [k, N, O / k]
  return jnp.moveaxis(parts, 0, 1).reshape(x.shape[:x.ndim - n_in] + q.inner_shape[n_in:])


def _einsum_fwd(spec, x, q, dtype):
  return quantized_einsum(spec, x, q, dtype), (q, jnp.zeros((0,), x.dtype))  # (q, x's dtype): no float weight


def _einsum_bwd(spec, dtype, residuals, g):
  """dx = g W^T. A large W is decoded a group of input rows at a time (dx's columns for those rows), so the
  backward of w1 and w3, whose cotangents arrive together, never holds two whole float weights."""
  q, x_dtype = residuals
  late, levels = _decode_after(q, g)
  n_in = _n_in(spec)
  k = _groups(q, n_in, rows=True)
  if k == 1:
    dx = jnp.einsum(_transposed_spec(spec), g, dequantize(late, dtype, levels))
    return dx.astype(x_dtype.dtype), _zero_cotangent(q)
  I, O = math.prod(q.inner_shape[:n_in]), math.prod(q.inner_shape[n_in:])
  g2 = g.reshape(-1, O)
  parts = jax.lax.map(lambda j: jnp.dot(g2, _decode_rows(late, j, I // k, O, dtype, levels).T), jnp.arange(k))
  dx = jnp.moveaxis(parts, 0, 1).reshape(g.shape[:g.ndim - (len(q.inner_shape) - n_in)] + q.inner_shape[:n_in])
  return dx.astype(x_dtype.dtype), _zero_cotangent(q)


quantized_einsum.defvjp(_einsum_fwd, _einsum_bwd)


# ---- the embedding: rows of a 2-D [R, C] weight ----------------------------------------------------------------
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
  per_row = C // q.block
  codes = jnp.take(q.codes.reshape(R, C // 2), index, axis=0)
  blocks = index[..., None] * per_row + jnp.arange(per_row)  # [*index.shape, C / block]
  return nf4_decode(codes, decode_scales(q, blocks), q.block).astype(q.dtype)


def gather_embedding(params: Params, tokens: jax.Array) -> tuple[Params, jax.Array]:
  """(params, tokens) for `model.forward` / `hidden_states` when the embedding is quantized: the rows of these
  tokens are decoded up front and the tokens renumbered to index them (model.py gathers with jnp.take, which a
  QuantizedWeight cannot serve). Unchanged when the embedding is a plain array. The base is frozen: the rows
  are behind stop_gradient, so no embedding gradient is ever formed."""
  embed = params["embed"]
  if not isinstance(embed, QuantizedWeight):
    return params, tokens
  rows = jax.lax.stop_gradient(take_rows(embed, tokens.reshape(-1)))
  local = jnp.arange(tokens.size, dtype=tokens.dtype).reshape(tokens.shape)
  return dict(params, embed=rows), local


# ---- the output head: column ranges of a 2-D [E, V] weight --------------------------------------------------------
def column_slice(q: QuantizedWeight, start, size: int, dtype=jnp.float32, levels=None) -> jax.Array:
  """dequantize(q)[:, start:start + size] for a 2-D [R, C] weight (the output head); `start` may be traced.
  NF4 needs C, start and size to be multiples of the block (see `vocab_chunk`); `levels` as in nf4_decode."""
  R, C = q.inner_shape
  if q.kind == "int8":
    codes = jax.lax.dynamic_slice_in_dim(q.codes, start, size, axis=1)
    scales = jax.lax.dynamic_slice_in_dim(q.scales, start, size, axis=1)
    return (codes.astype(jnp.float32) * scales.astype(jnp.float32)).astype(dtype)
  return _decode_columns(q, start, size, R, C, dtype, levels)


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


def _chunk_logits(x2, q, i, chunk, V):
  """Logits float32 [N, C] of chunk i and the chunk's bounds: the last chunk is shifted back to end at V and
  its columns already seen by chunk i - 1 get -inf (a [C] row added, so no [N, C] fill value is built)."""
  first = i * chunk                      # the first column this chunk is responsible for
  start = jnp.minimum(first, V - chunk)  # where it reads from
  logits = jnp.dot(x2, column_slice(q, start, chunk, x2.dtype), preferred_element_type=jnp.float32)
  seen = jnp.where(start + jnp.arange(chunk) >= first, 0.0, -jnp.inf)
  return logits + seen[None, :], first, start


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_ce(x2, q, t2, chunk):
  return _head_ce_fwd(x2, q, t2, chunk)[0]


def _head_ce_fwd(x2, q, t2, chunk):
  V = q.inner_shape[1]

  def body(carry, i):  # an online log-sum-exp over the vocabulary chunks
    peak, total, target_logit = carry
    logits, first, start = _chunk_logits(x2, q, i, chunk, V)
    new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
    total = total * jnp.exp(peak - new_peak) + jnp.sum(jnp.exp(logits - new_peak[:, None]), axis=-1)
    inside = (t2 >= first) & (t2 < start + chunk)
    picked = jnp.take_along_axis(logits, jnp.clip(t2 - start, 0, chunk - 1)[:, None], axis=-1)[:, 0]
    return (new_peak, total, target_logit + jnp.where(inside, picked, 0.0)), None

  N = x2.shape[0]
  init = (jnp.full((N,), -jnp.inf, jnp.float32), jnp.zeros((N,), jnp.float32), jnp.zeros((N,), jnp.float32))
  (peak, total, target_logit), _ = jax.lax.scan(body, init, jnp.arange(-(-V // chunk)))
  lse = jnp.log(total) + peak
  return lse - target_logit, (x2, q, t2, lse)


def _head_ce_bwd(chunk, residuals, g):
  """dx = sum over chunks of (softmax - onehot) g @ W_chunk.T, each chunk's logits recomputed."""
  x2, q, t2, lse = residuals
  V = q.inner_shape[1]
  g = g.astype(jnp.float32)
  late, levels = _decode_after(q, g)

  def body(dx, i):
    logits, first, start = _chunk_logits(x2, q, i, chunk, V)
    onehot = (start + jnp.arange(chunk))[None, :] == t2[:, None]
    d = (jnp.exp(logits - lse[:, None]) - (onehot & (t2 >= first)[:, None])) * g[:, None]
    w = column_slice(late, start, chunk, x2.dtype, levels)
    return dx + jnp.dot(d.astype(x2.dtype), w.T, preferred_element_type=jnp.float32), None

  dx, _ = jax.lax.scan(body, jnp.zeros(x2.shape, jnp.float32), jnp.arange(-(-V // chunk)))
  return dx.astype(x2.dtype), _zero_cotangent(q), None


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)


def quantized_head_cross_entropy(x: jax.Array, q: QuantizedWeight, targets: jax.Array, *,
                                 max_chunk: int = 4096) -> jax.Array:
  """Per-token cross-entropy float32 [B, T] of the logits x @ dequantize(q) against targets [B, T], for a frozen
  quantized output head [E, V]: the head is decoded one vocabulary chunk at a time (an online log-sum-exp in the
  forward; the backward recomputes each chunk's logits from the saved log-sum-exp), so neither the dequantized
  head nor the [B, T, V] logits ever exist; memory O(N * C + E * C). Gradients flow to x only."""
  chex.assert_rank(x, 3)
  chex.assert_shape(targets, x.shape[:2])
  B, T, E = x.shape
  chunk = vocab_chunk(q, max_chunk)
  if chunk is None:
    raise ValueError(f"head {q} cannot be split into whole blocks; dequantize it instead")
  chex.assert_equal(q.inner_shape[0], E)
  losses = _head_ce(x.reshape(B * T, E), q, targets.reshape(B * T).astype(jnp.int32), chunk)
  return losses.reshape(B, T)
