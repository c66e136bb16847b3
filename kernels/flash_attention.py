"""Pallas flash attention: forward and backward (a custom_vjp), causal by slot index, packed segments, GQA.

Shapes: B batch, T query tokens, S key/value slots, K kv heads, G query heads per kv head, D head_dim.
Kernel layout: F query heads folded into the rows of a query block (F = largest power of two dividing G), so each
kv tile loaded serves F heads and no repeat of k/v is materialized; Gg = G / F head groups per kv head;
Tp = T padded to the query block, R = Tp * F query rows (row r is token r // F, head gg * F + r % F);
Sp = S padded to the kv block; nq = R / block_q, nk = Sp / block_k.
  q, o, dq   [B, K, Gg, R, D]      k, v, dk, dv  [B, K, Sp, D]
  lse, delta [B, K, Gg, R] f32     q_pos, q_seg  [B, R] int32     kv_seg [B, Sp] int32

The kernels are written for the generic `pl.pallas_call` in the Triton style (a grid over query or kv blocks, an
in-kernel loop over the other axis): on CPU they run with interpret=True, on GPU they lower through Triton. Block
sizes must be powers of two >= 16 and D a power of two for Triton; the dispatch adapter falls back otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.flash_attention_reference import attention_reference, default_q_index

NEG_INF = -1e30  # finite: exp(NEG_INF - NEG_INF) stays a number; masked probabilities are zeroed explicitly


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query-row and kv-slot tiles of the forward and of the two backward kernels (powers of two, >= 16)."""
  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64

  @classmethod
  def for_backend(cls, backend: str) -> "BlockSizes":
    if backend == "gpu":  # measured on an H200 at D = 128 (BENCHMARKS.md): 64-tiles with 4 warps everywhere
      return cls(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)
    return cls()  # interpret mode: few, larger tiles keep the Python-level grid loop short


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  causal: bool
  has_seg: bool
  kv_len: int  # real S; padded slots beyond it are masked
  groups: int  # Gg
  blocks: BlockSizes
  interpret: bool


def _dot(a, b, contract):
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _nt(a, b):  # a [m, d], b [n, d] -> [m, n]
  return _dot(a, b, ((1,), (1,)))


def _nn(a, b):  # a [m, n], b [n, d] -> [m, d]
  return _dot(a, b, ((1,), (0,)))


def _tn(a, b):  # a [m, n], b [m, d] -> [n, d]
  return _dot(a, b, ((0,), (0,)))


def _mask(st: _Static, q_pos, q_seg, kv_seg, kv_start, block_k):
  """[bq, bk] visibility: real slot, causal by slot index, same segment."""
  kv_idx = kv_start + jnp.arange(block_k, dtype=jnp.int32)
  mask = jnp.broadcast_to((kv_idx < st.kv_len)[None, :], (q_pos.shape[0], block_k))
  if st.causal:
    mask &= kv_idx[None, :] <= q_pos[:, None]
  if st.has_seg:
    mask &= q_seg[:, None] == kv_seg[None, :]
  return mask


def _kv_end(st: _Static, q_pos, nk: int, block_k: int):
  """One past the last kv block any row of this query block can see (every row's q_pos >= -1)."""
  if not st.causal:
    return nk
  return jnp.minimum(nk, lax.div(jnp.max(q_pos) + block_k, block_k))


def _split_refs(refs, st: _Static, n_in: int):
  """Kernel refs -> (inputs, q_seg_ref, kv_seg_ref, outputs); segment refs are absent without segments."""
  if st.has_seg:
    return refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2:]
  return refs[:n_in], None, None, refs[n_in:]


# ---- kernels -------------------------------------------------------------------------------------------------------
def _fwd_kernel(*refs, st: _Static):
  (q_ref, k_ref, v_ref, pos_ref), qseg_ref, kvseg_ref, (o_ref, lse_ref) = _split_refs(refs, st, 4)
  bq, D = q_ref.shape
  bk = st.blocks.block_k
  q, q_pos = q_ref[...], pos_ref[...]
  q_seg = qseg_ref[...] if st.has_seg else None

  def body(j, carry):
    acc, m, l = carry
    start = j * bk
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    kv_seg = kvseg_ref[pl.ds(start, bk)] if st.has_seg else None
    mask = _mask(st, q_pos, q_seg, kv_seg, start, bk)
    s = jnp.where(mask, _nt(q, k) * st.scale, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = alpha[:, None] * acc + _nn(p.astype(v.dtype), v)
    return acc, m_new, alpha * l + jnp.sum(p, axis=1)

  init = (jnp.zeros((bq, D), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, _kv_end(st, q_pos, k_ref.shape[0] // bk, bk), body, init)
  l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that sees nothing returns zeros
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


def _dq_kernel(*refs, st: _Static):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pos_ref), qseg_ref, kvseg_ref, (dq_ref,) = _split_refs(
      refs, st, 7)
  bq, D = q_ref.shape
  bk = st.blocks.block_k_bwd
  q, do, q_pos = q_ref[...], do_ref[...], pos_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = qseg_ref[...] if st.has_seg else None

  def body(j, dq):
    start = j * bk
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    kv_seg = kvseg_ref[pl.ds(start, bk)] if st.has_seg else None
    mask = _mask(st, q_pos, q_seg, kv_seg, start, bk)
    p = jnp.where(mask, jnp.exp(_nt(q, k) * st.scale - lse[:, None]), 0.0)
    ds = p * (_nt(do, v) - delta[:, None])
    return dq + _nn(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, _kv_end(st, q_pos, k_ref.shape[0] // bk, bk), body, jnp.zeros((bq, D), jnp.float32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: _Static):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pos_ref, qmax_ref), qseg_ref, kvseg_ref, (dk_ref, dv_ref) = (
      _split_refs(refs, st, 8))
  bk, D = k_ref.shape
  bq = st.blocks.block_q_bwd
  nq = q_ref.shape[1] // bq
  start = pl.program_id(2) * bk
  k, v = k_ref[...], v_ref[...]
  kv_seg = kvseg_ref[...] if st.has_seg else None
  if st.causal:  # first query block whose largest slot index reaches this kv block; earlier ones see none of it
    qmax = qmax_ref[...]
    first = jnp.min(jnp.where(qmax >= start, jnp.arange(qmax.shape[0], dtype=jnp.int32), nq))
  else:
    first = 0

  def body(i, carry, g):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[g, rows, :], do_ref[g, rows, :]
    lse, delta = lse_ref[g, rows], delta_ref[g, rows]
    q_seg = qseg_ref[rows] if st.has_seg else None
    mask = _mask(st, pos_ref[rows], q_seg, kv_seg, start, bk)
    p = jnp.where(mask, jnp.exp(_nt(q, k) * st.scale - lse[:, None]), 0.0)
    dv = dv + _tn(p.astype(do.dtype), do)
    ds = p * (_nt(do, v) - delta[:, None])
    return dk + _tn(ds.astype(q.dtype), q), dv

  carry = (jnp.zeros((bk, D), jnp.float32), jnp.zeros((bk, D), jnp.float32))
  for g in range(st.groups):  # every query head group of this kv head adds into the same dk/dv tile
    carry = lax.fori_loop(first, nq, functools.partial(body, g=g), carry)
  dk_ref[...] = (carry[0] * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


# ---- pallas_call wiring ----------------------------------------------------------------------------------------------
def _call(kernel, st: _Static, grid, in_specs, out_specs, out_shape, args, name, tiles):
  kwargs = {}
  if not st.interpret:
    from jax.experimental.pallas import triton as plgpu
    # Warps follow this kernel's own tiles: a 128-row tile with D = 128 wants 8 warps of registers, while the
    # 64 x 64 backward ran at half speed with 8 (H200: 135 against 258 TFLOP/s fwd+bwd at T = 4096).
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=8 if max(tiles) >= 128 else 4, num_stages=2)
  return pl.pallas_call(functools.partial(kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=st.interpret, name=name, **kwargs)(*args)


def _forward(st: _Static, q, k, v, q_pos, q_seg, kv_seg):
  B, K, Gg, R, D = q.shape
  Sp = k.shape[2]
  bq = st.blocks.block_q
  qmap = lambda b, h, i: (b, h // Gg, h % Gg, i, 0)
  kvmap = lambda b, h, i: (b, h // Gg, 0, 0)
  in_specs = [pl.BlockSpec((None, None, None, bq, D), qmap), pl.BlockSpec((None, None, Sp, D), kvmap),
              pl.BlockSpec((None, None, Sp, D), kvmap), pl.BlockSpec((None, bq), lambda b, h, i: (b, i))]
  args = [q, k, v, q_pos]
  if st.has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)), pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))]
    args += [q_seg, kv_seg]
  out_specs = [pl.BlockSpec((None, None, None, bq, D), qmap),
               pl.BlockSpec((None, None, None, bq), lambda b, h, i: (b, h // Gg, h % Gg, i))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, K, Gg, R), jnp.float32)]
  return _call(_fwd_kernel, st, (B, K * Gg, R // bq), in_specs, out_specs, out_shape, args, "flash_fwd",
               (bq, st.blocks.block_k))


def _backward(st: _Static, q, k, v, q_pos, q_seg, kv_seg, o, lse, do):
  B, K, Gg, R, D = q.shape
  Sp = k.shape[2]
  bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, K, Gg, R]
  rowmap = lambda b, h, i: (b, i)

  qmap = lambda b, h, i: (b, h // Gg, h % Gg, i, 0)
  kvmap = lambda b, h, i: (b, h // Gg, 0, 0)
  statmap = lambda b, h, i: (b, h // Gg, h % Gg, i)
  in_specs = [pl.BlockSpec((None, None, None, bq, D), qmap), pl.BlockSpec((None, None, Sp, D), kvmap),
              pl.BlockSpec((None, None, Sp, D), kvmap), pl.BlockSpec((None, None, None, bq, D), qmap),
              pl.BlockSpec((None, None, None, bq), statmap), pl.BlockSpec((None, None, None, bq), statmap),
              pl.BlockSpec((None, bq), rowmap)]
  args = [q, k, v, do, lse, delta, q_pos]
  if st.has_seg:
    in_specs += [pl.BlockSpec((None, bq), rowmap), pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0))]
    args += [q_seg, kv_seg]
  (dq,) = _call(_dq_kernel, st, (B, K * Gg, R // bq), in_specs, [pl.BlockSpec((None, None, None, bq, D), qmap)],
                [jax.ShapeDtypeStruct(q.shape, q.dtype)], args, "flash_dq", (bq, bk))

  # Largest slot index per query block, padded to a power of two with -1 (a block that sees nothing).
  nq = R // bq
  qmax = jnp.max(q_pos.reshape(B, nq, bq), axis=-1)
  qmax = jnp.pad(qmax, ((0, 0), (0, pl.next_power_of_2(nq) - nq)), constant_values=-1)
  whole_q = pl.BlockSpec((None, None, Gg, R, D), lambda b, h, j: (b, h, 0, 0, 0))
  whole_stat = pl.BlockSpec((None, None, Gg, R), lambda b, h, j: (b, h, 0, 0))
  tile = pl.BlockSpec((None, None, bk, D), lambda b, h, j: (b, h, j, 0))
  whole_row = pl.BlockSpec((None, R), lambda b, h, j: (b, 0))
  in_specs = [whole_q, tile, tile, whole_q, whole_stat, whole_stat, whole_row,
              pl.BlockSpec((None, qmax.shape[1]), lambda b, h, j: (b, 0))]
  args = [q, k, v, do, lse, delta, q_pos, qmax]
  if st.has_seg:
    in_specs += [whole_row, pl.BlockSpec((None, bk), lambda b, h, j: (b, j))]
    args += [q_seg, kv_seg]
  dk, dv = _call(_dkv_kernel, st, (B, K, Sp // bk), in_specs, [tile, tile],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)], args, "flash_dkv",
                 (bq, bk))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, q_pos, q_seg, kv_seg):
  return _forward(st, q, k, v, q_pos, q_seg, kv_seg)[0]


def _flash_fwd(st, q, k, v, q_pos, q_seg, kv_seg):
  o, lse = _forward(st, q, k, v, q_pos, q_seg, kv_seg)
  return o, (q, k, v, q_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(st, res, do):
  q, k, v, q_pos, q_seg, kv_seg, o, lse = res
  dq, dk, dv = _backward(st, q, k, v, q_pos, q_seg, kv_seg, o, lse, do)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- public API ------------------------------------------------------------------------------------------------------
def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _fold(G: int, block_q: int) -> int:
  f = 1
  while G % (2 * f) == 0 and 2 * f <= block_q:
    f *= 2
  return f


@functools.partial(jax.jit, static_argnames=("causal", "block_sizes", "interpret"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array | None = None,
                    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None, *,
                    causal: bool = True, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Flash attention. q [B, T, K, G, D], k/v [B, S, K, D] -> [B, T, K, G, D] in q.dtype; differentiable in q, k, v.

  q_index [B, T] int32: the kv slot of each query (default: the last T slots, i.e. arange(T) when T == S); with
  `causal`, query t sees slots s <= q_index[t]. Segment ids q [B, T] / kv [B, S] apply when both are given. Rows
  that see nothing return zeros. Softmax and accumulation run in float32 whatever the input dtype.
  """
  chex.assert_rank([q, k, v], [5, 4, 4])
  B, T, K, G, D = q.shape
  S = k.shape[1]
  chex.assert_shape([k, v], (B, S, K, D))
  if q_index is None:
    q_index = default_q_index(B, T, S)
  chex.assert_shape(q_index, (B, T))
  has_seg = q_segment_ids is not None and kv_segment_ids is not None
  if has_seg:
    chex.assert_shape([q_segment_ids, kv_segment_ids], [(B, T), (B, S)])
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  blocks = block_sizes or BlockSizes.for_backend(jax.default_backend())
  F = min(_fold(G, blocks.block_q), _fold(G, blocks.block_q_bwd))
  Gg = G // F
  # Pad T to whole query blocks of both passes and S to whole kv blocks; padded rows get slot -1 (see nothing).
  Tp = _round_up(T, max(blocks.block_q, blocks.block_q_bwd) // F)
  Sp = _round_up(S, max(blocks.block_k, blocks.block_k_bwd))
  qp = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))
  qp = qp.reshape(B, Tp, K, Gg, F, D).transpose(0, 2, 3, 1, 4, 5).reshape(B, K, Gg, Tp * F, D)
  kvpad = ((0, 0), (0, Sp - S), (0, 0), (0, 0))
  kp = jnp.pad(k, kvpad).transpose(0, 2, 1, 3)
  vp = jnp.pad(v, kvpad).transpose(0, 2, 1, 3)
  rows = lambda x, fill: jnp.repeat(jnp.pad(x.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=fill), F,
                                    axis=1)
  q_pos = rows(q_index, -1)
  q_seg = rows(q_segment_ids, -1) if has_seg else None
  kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, Sp - S)), constant_values=-2) if has_seg else None
  st = _Static(scale=D ** -0.5, causal=causal, has_seg=has_seg, kv_len=S, groups=Gg, blocks=blocks,
               interpret=bool(interpret))
  out = _flash(st, qp, kp, vp, q_pos, q_seg, kv_seg)
  out = out.reshape(B, K, Gg, Tp, F, D).transpose(0, 3, 1, 2, 4, 5).reshape(B, Tp, K, G, D)
  return out[:, :T]


# ---- dispatch adapter ------------------------------------------------------------------------------------------------
def _pow2(n: int) -> bool:
  return n >= 16 and n & (n - 1) == 0


def kernel_supports(head_dim: int, block_sizes: BlockSizes | None = None, backend: str | None = None) -> bool:
  """Whether the kernel runs here: any shape interpreted on CPU; Triton on GPU wants power-of-two tiles and D."""
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return True
  if backend != "gpu":  # TPU would need Mosaic-specific tiling this kernel does not declare
    return False
  blocks = block_sizes or BlockSizes.for_backend(backend)
  return all(_pow2(b) for b in (head_dim, *dataclasses.astuple(blocks)))


_warned: set[str] = set()


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                     q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None, *,
                     block_sizes: BlockSizes | None = None) -> jax.Array:
  """The "pallas" attention impl (xla_attention's signature). Any q_index works (full forward, prefill after a
  cache, decode). Falls back to the xla reference, warning once, where `kernel_supports` says no (TPU; on GPU a
  head_dim or block size that is not a power of two >= 16)."""
  backend = jax.default_backend()
  if not kernel_supports(q.shape[-1], block_sizes, backend):
    from internlm_jax.attention import xla_attention
    key = f"{backend}/{q.shape[-1]}"
    if key not in _warned:
      _warned.add(key)
      warnings.warn(f"pallas attention unsupported on {backend} with head_dim {q.shape[-1]}; using xla")
    return xla_attention(q, k, v, q_index, q_segment_ids, kv_segment_ids)
  return flash_attention(q, k, v, q_index, q_segment_ids, kv_segment_ids, causal=True, block_sizes=block_sizes)


def _register():
  from internlm_jax.attention import register_attention
  register_attention("pallas", pallas_attention)


_register()

__all__ = ["BlockSizes", "attention_reference", "flash_attention", "kernel_supports", "pallas_attention"]
