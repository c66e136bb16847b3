"""Blockwise attention in pure JAX: flash attention's algorithm with XLA ops, memory O(T * block), any backend.

Shapes: B batch, T query tokens, S key/value slots, K kv heads, G query heads per kv head, D head_dim,
Q = query block, C = kv block (each at most `block_size`), Tp/Sp = T/S padded to the block, nq = Tp / Q, nk = Sp / C.

Forward: a `lax.map` over query blocks, each running an online softmax over only the kv blocks its causal range
reaches (a `fori_loop` with a data-dependent end). A custom_vjp saves the output and the float32 log-sum-exp and
recomputes probabilities block by block in backward (a dq pass over query blocks, a dk/dv pass over kv blocks), so
neither pass ever holds a [T, S] array. Rows that see nothing return zeros (the "xla" reference averages all values
there; real packed batches never produce such rows).
"""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from internlm_jax.attention import register_attention

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class _Static:
  block_q: int
  block_k: int
  kv_len: int  # real S: padded slots are masked
  has_seg: bool


def _mask(st: _Static, q_pos, q_seg, kv_seg, kv_start):
  """[B, Q, C] visibility of kv block starting at `kv_start` from a query block."""
  kv_idx = kv_start + jnp.arange(st.block_k, dtype=jnp.int32)
  mask = (kv_idx[None, None, :] <= q_pos[:, :, None]) & (kv_idx < st.kv_len)[None, None, :]
  if st.has_seg:
    mask &= q_seg[:, :, None] == kv_seg[:, None, :]
  return mask


def _slice(x, i, size, axis):
  return lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _scores(q, k, scale):  # q [B, K, G, Q, D], k [B, K, C, D] -> [B, K, G, Q, C] f32
  return jnp.einsum("bkgqd,bkcd->bkgqc", q, k, preferred_element_type=jnp.float32) * scale


def _kv_end(st, q_pos, nk):
  return jnp.minimum(nk, (jnp.max(q_pos) + st.block_k) // st.block_k)  # q_pos >= -1 everywhere


def _forward(st: _Static, q, k, v, q_pos, q_seg, kv_seg):
  """q [B, K, G, Tp, D], k/v [B, K, Sp, D] -> out like q, lse [B, K, G, Tp]."""
  B, K, G, Tp, D = q.shape
  Q, C, nk = st.block_q, st.block_k, k.shape[2] // st.block_k
  scale = D ** -0.5

  def one_q_block(i):
    qb, pos = _slice(q, i, Q, 3), _slice(q_pos, i, Q, 1)
    seg = _slice(q_seg, i, Q, 1) if st.has_seg else None

    def body(j, carry):
      acc, m, l = carry
      kb, vb = _slice(k, j, C, 2), _slice(v, j, C, 2)
      mask = _mask(st, pos, seg, _slice(kv_seg, j, C, 1) if st.has_seg else None, j * C)[:, None, None]
      s = jnp.where(mask, _scores(qb, kb, scale), NEG_INF)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqc,bkcd->bkgqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
      return alpha[..., None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=-1)

    init = (jnp.zeros((B, K, G, Q, D), jnp.float32), jnp.full((B, K, G, Q), NEG_INF, jnp.float32),
            jnp.zeros((B, K, G, Q), jnp.float32))
    acc, m, l = lax.fori_loop(0, _kv_end(st, pos, nk), body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    return (acc / l_safe[..., None]).astype(q.dtype), m + jnp.log(l_safe)

  out, lse = lax.map(one_q_block, jnp.arange(Tp // Q))  # [nq, B, K, G, Q, (D)]
  out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, Tp, D)
  return out, jnp.moveaxis(lse, 0, 3).reshape(B, K, G, Tp)


def _backward(st: _Static, q, k, v, q_pos, q_seg, kv_seg, o, lse, do):
  B, K, G, Tp, D = q.shape
  Q, C = st.block_q, st.block_k
  nk, nq = k.shape[2] // C, Tp // Q
  scale = D ** -0.5
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, K, G, Tp]

  def probs(i, j):
    """Recomputed probabilities and dp - delta for query block i and kv block j."""
    qb, dob = _slice(q, i, Q, 3), _slice(do, i, Q, 3)
    kb, vb = _slice(k, j, C, 2), _slice(v, j, C, 2)
    mask = _mask(st, _slice(q_pos, i, Q, 1), _slice(q_seg, i, Q, 1) if st.has_seg else None,
                 _slice(kv_seg, j, C, 1) if st.has_seg else None, j * C)[:, None, None]
    p = jnp.where(mask, jnp.exp(_scores(qb, kb, scale) - _slice(lse, i, Q, 3)[..., None]), 0.0)
    dp = jnp.einsum("bkgqd,bkcd->bkgqc", dob, vb, preferred_element_type=jnp.float32)
    return qb, dob, kb, p, p * (dp - _slice(delta, i, Q, 3)[..., None])

  def dq_block(i):
    def body(j, dq):
      _, _, kb, _, ds = probs(i, j)
      return dq + jnp.einsum("bkgqc,bkcd->bkgqd", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
    dq = lax.fori_loop(0, _kv_end(st, _slice(q_pos, i, Q, 1), nk), body, jnp.zeros((B, K, G, Q, D), jnp.float32))
    return (dq * scale).astype(q.dtype)

  # Largest slot index per query block: kv block j is seen only from the first block whose max reaches j * C.
  qmax = jnp.max(q_pos.reshape(B, nq, Q), axis=(0, 2))

  def dkv_block(j):
    def body(i, carry):
      dk, dv = carry
      qb, dob, _, p, ds = probs(i, j)
      dv += jnp.einsum("bkgqc,bkgqd->bkcd", p.astype(do.dtype), dob, preferred_element_type=jnp.float32)
      dk += jnp.einsum("bkgqc,bkgqd->bkcd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
      return dk, dv
    first = jnp.min(jnp.where(qmax >= j * C, jnp.arange(nq), nq))
    zeros = jnp.zeros((B, K, C, D), jnp.float32)
    dk, dv = lax.fori_loop(first, nq, body, (zeros, zeros))
    return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

  dq = jnp.moveaxis(lax.map(dq_block, jnp.arange(nq)), 0, 3).reshape(q.shape)
  dk, dv = lax.map(dkv_block, jnp.arange(nk))  # [nk, B, K, C, D]
  dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(st, q, k, v, q_pos, q_seg, kv_seg):
  return _forward(st, q, k, v, q_pos, q_seg, kv_seg)[0]


def _blockwise_fwd(st, q, k, v, q_pos, q_seg, kv_seg):
  o, lse = _forward(st, q, k, v, q_pos, q_seg, kv_seg)
  return o, (q, k, v, q_pos, q_seg, kv_seg, o, lse)


def _blockwise_bwd(st, res, do):
  return (*_backward(st, *res, do), None, None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                        q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None, *,
                        block_size: int = 512) -> jax.Array:
  """xla_attention's contract in O(T * block) memory. q [B, T, K, G, D], k/v [B, S, K, D] -> [B, T, K, G, D].

  `block_size` tiles both queries and keys; each tile shrinks to its (8-rounded) length for short inputs, so a
  decode step (T = 1) does not pad to a full block of queries.
  """
  chex.assert_rank([q, k, v, q_index], [5, 4, 4, 2])
  B, T, K, G, D = q.shape
  S = k.shape[1]
  chex.assert_shape([k, v], (B, S, K, D))
  chex.assert_shape(q_index, (B, T))
  has_seg = q_segment_ids is not None and kv_segment_ids is not None
  block_q, block_k = min(block_size, _round_up(T, 8)), min(block_size, _round_up(S, 8))
  Tp, Sp = _round_up(T, block_q), _round_up(S, block_k)
  qp = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0))).transpose(0, 2, 3, 1, 4)
  kvpad = ((0, 0), (0, Sp - S), (0, 0), (0, 0))
  kp, vp = jnp.pad(k, kvpad).transpose(0, 2, 1, 3), jnp.pad(v, kvpad).transpose(0, 2, 1, 3)
  q_pos = jnp.pad(q_index.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
  q_seg = kv_seg = None
  if has_seg:
    q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, Sp - S)), constant_values=-2)
  out = _blockwise(_Static(block_q, block_k, S, has_seg), qp, kp, vp, q_pos, q_seg, kv_seg)
  return out.transpose(0, 3, 1, 2, 4)[:, :T]


register_attention("blockwise", blockwise_attention)
