"""Pallas paged decode attention: one new token per sequence over a paged KV cache, grouped-query, optional int8 or
int4 KV.

Shapes: B batch, H query heads, K kv heads, G = H / K query heads per kv head, Gp = G padded to a power of two
(>= 16 on GPU, where Triton's dot wants 16 rows), D head_dim, P pages in the pool, ps page_size, pps pages per
sequence (page-table width), n splits of the page range, pb pages gathered per loop step.
  q [B, H, D]    k_pages, v_pages [K, P, ps, D] (float, or int8 with k_scales, v_scales [K, P, ps] float32)
                 or [K, P, ps, D // 2] uint8, packed int4 with scales and k_zeros, v_zeros [K, P, ps] float32
  page_table [B, pps] int32    lengths [B] int32    out [B, H, D]

Design: a grid over (sequence, kv head, split). Generic Pallas has no scalar prefetch on GPU, so each program
loads its slice of the page table and gathers pages inside the kernel (`pages_ref[ids]`). All G query heads of a
kv head share each loaded page. Splits (flash-decoding) keep a GPU busy when B * K is small; their partial
softmax states are merged in JAX. Table slots past a sequence's length are never dereferenced (clamped to page 0)
and their values are zeroed, so stale or poisoned pages cannot leak into the result.

int4 pages are never dequantized into a [tokens, D] tile: byte j holds elements j and j + D / 2 (see
quantize_kv_int4), so a mask and a shift give the two halves of head_dim, each one dot against its half of q.
The zero point folds out of the dots: q . (k * scale + zero) = scale * (q . k) + zero * sum(q), and
sum_t p_t (v_t * scale_t + zero_t) = (p * scale) . v + p . zero.
"""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.paged_attention_reference import paged_attention_reference, quantize_kv, quantize_kv_int4

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class _Static:
  pages_per_block: int
  pages_per_split: int
  quantized: bool
  interpret: bool
  int4: bool = False


def _kernel(*refs, st: _Static):
  if st.int4:
    return _kernel_int4(*refs, st=st)
  if st.quantized:
    q_ref, k_ref, v_ref, ks_ref, vs_ref, table_ref, len_ref, acc_ref, m_ref, l_ref = refs
  else:
    q_ref, k_ref, v_ref, table_ref, len_ref, acc_ref, m_ref, l_ref = refs
  Gp, D = q_ref.shape
  ps = k_ref.shape[1]
  pb = st.pages_per_block
  q = q_ref[...]
  length = len_ref[0]
  first = pl.program_id(2) * st.pages_per_split
  end = jnp.minimum((length + ps - 1) // ps, first + st.pages_per_split)  # one past this split's last live page
  steps = (jnp.maximum(end - first, 0) + pb - 1) // pb

  def body(i, carry):
    acc, m, l = carry
    page_pos = first + i * pb + jnp.arange(pb, dtype=jnp.int32)
    ids = jnp.where(page_pos < end, table_ref[pl.ds(i * pb, pb)], 0)  # never follow a stale table slot
    slot = (page_pos[:, None] * ps + jnp.arange(ps, dtype=jnp.int32)[None, :]).reshape(pb * ps)
    valid = slot < length
    k = jnp.where(valid[:, None], k_ref[ids].reshape(pb * ps, D), 0)
    v = jnp.where(valid[:, None], v_ref[ids].reshape(pb * ps, D), 0)
    s = lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if st.quantized:  # per-token scales: keys scale their score column, values their probability column
      s = s * jnp.where(valid, ks_ref[ids].reshape(pb * ps), 0.0)[None, :]
    s = jnp.where(valid[None, :], s * D ** -0.5, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1)
    if st.quantized:
      p = p * jnp.where(valid, vs_ref[ids].reshape(pb * ps), 0.0)[None, :]
    pv = lax.dot_general(p.astype(q.dtype), v.astype(q.dtype), (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_new, l

  init = (jnp.zeros((Gp, D), jnp.float32), jnp.full((Gp,), NEG_INF, jnp.float32), jnp.zeros((Gp,), jnp.float32))
  acc, m, l = lax.fori_loop(0, steps, body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _kernel_int4(q_ref, k_ref, v_ref, ks_ref, vs_ref, kz_ref, vz_ref, table_ref, len_ref, acc_ref, m_ref, l_ref, *,
                 st: _Static):
  """_kernel's loop over packed int4 pages: two half-width dots per product, zero points folded out of them."""
  Gp, D = q_ref.shape
  Dh = D // 2
  ps = k_ref.shape[1]
  pb = st.pages_per_block
  q_lo, q_hi = q_ref[:, :Dh], q_ref[:, Dh:]
  q_sum = jnp.sum(q_lo.astype(jnp.float32), axis=1) + jnp.sum(q_hi.astype(jnp.float32), axis=1)
  dtype = q_lo.dtype
  length = len_ref[0]
  first = pl.program_id(2) * st.pages_per_split
  end = jnp.minimum((length + ps - 1) // ps, first + st.pages_per_split)
  steps = (jnp.maximum(end - first, 0) + pb - 1) // pb
  dot_t = lambda a, b: lax.dot_general(a, b.astype(dtype), (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
  dot = lambda a, b: lax.dot_general(a, b.astype(dtype), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  def body(i, carry):
    acc_lo, acc_hi, m, l = carry
    page_pos = first + i * pb + jnp.arange(pb, dtype=jnp.int32)
    ids = jnp.where(page_pos < end, table_ref[pl.ds(i * pb, pb)], 0)
    slot = (page_pos[:, None] * ps + jnp.arange(ps, dtype=jnp.int32)[None, :]).reshape(pb * ps)
    valid = slot < length
    k = jnp.where(valid[:, None], k_ref[ids].reshape(pb * ps, Dh), 0)
    v = jnp.where(valid[:, None], v_ref[ids].reshape(pb * ps, Dh), 0)
    per_token = lambda ref: jnp.where(valid, ref[ids].reshape(pb * ps), 0.0)
    k_scale, v_scale, k_zero, v_zero = per_token(ks_ref), per_token(vs_ref), per_token(kz_ref), per_token(vz_ref)
    s = dot_t(q_lo, k & 0xF) + dot_t(q_hi, k >> 4)
    s = s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
    s = jnp.where(valid[None, :], s * D ** -0.5, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1)
    pz = jnp.sum(p * v_zero[None, :], axis=1)[:, None]
    pw = (p * v_scale[None, :]).astype(dtype)
    acc_lo = alpha[:, None] * acc_lo + dot(pw, v & 0xF) + pz
    acc_hi = alpha[:, None] * acc_hi + dot(pw, v >> 4) + pz
    return acc_lo, acc_hi, m_new, l

  half = jnp.zeros((Gp, Dh), jnp.float32)
  init = (half, half, jnp.full((Gp,), NEG_INF, jnp.float32), jnp.zeros((Gp,), jnp.float32))
  acc_lo, acc_hi, m, l = lax.fori_loop(0, steps, body, init)
  acc_ref[:, :Dh] = acc_lo
  acc_ref[:, Dh:] = acc_hi
  m_ref[...] = m
  l_ref[...] = l


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("pages_per_block", "num_splits", "interpret"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    lengths: jax.Array, k_scales: jax.Array | None = None, v_scales: jax.Array | None = None,
                    k_zeros: jax.Array | None = None, v_zeros: jax.Array | None = None, *,
                    pages_per_block: int | None = None, num_splits: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Decode attention of q [B, H, D] over each sequence's first lengths[b] cached tokens -> [B, H, D] in q.dtype.

  Token t of sequence b lives in page page_table[b, t // ps] at offset t % ps. Slots at or past lengths[b]
  (including whole table entries) are ignored; a sequence of length 0 returns zeros. With int8 pages pass the
  per-token float32 scales (see `quantize_kv`); with packed int4 pages [K, P, ps, D // 2] uint8 the scales and
  zeros (see `quantize_kv_int4`). pages_per_block (gathered per loop step) and num_splits (page
  ranges handled by separate programs, merged afterwards) default per backend.
  """
  chex.assert_rank([q, k_pages, v_pages, page_table, lengths], [3, 4, 4, 2, 1])
  B, H, D = q.shape
  K, P, ps, Dk = k_pages.shape
  pps = page_table.shape[1]
  chex.assert_shape(v_pages, k_pages.shape)
  chex.assert_shape([page_table, lengths], [(B, pps), (B,)])
  quantized = k_scales is not None
  if quantized != (v_scales is not None):
    raise ValueError("int8 KV needs both k_scales and v_scales")
  if quantized:
    chex.assert_shape([k_scales, v_scales], (K, P, ps))
  int4 = k_zeros is not None
  if int4 != (v_zeros is not None) or (int4 and not quantized):
    raise ValueError("int4 KV needs k_scales, v_scales, k_zeros and v_zeros")
  if int4:
    if D % 2 or Dk != D // 2 or k_pages.dtype != jnp.uint8:
      raise ValueError(f"int4 KV pages are [K, P, ps, D // 2] uint8 (two values a byte, D even); got "
                       f"{k_pages.dtype}{list(k_pages.shape)} for head_dim {D}")
    chex.assert_shape([k_zeros, v_zeros], (K, P, ps))
  if H % K:
    raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  if not interpret and (_next_pow2(ps) != ps or _next_pow2(D) != D):
    raise ValueError(f"the Triton kernel needs a power-of-two page_size and head_dim, got {ps} and {D}")
  G = H // K
  Gp = max(_next_pow2(G), 1 if interpret else 16)
  # On a GPU a loop step's k and v tiles (pb * ps tokens each) must fit shared memory with Triton's pipelining:
  # 128 tokens of D = 128 bf16 is 32 KB apiece; 512 asked for 528 KB on an H200 (232 KB available).
  pb = pages_per_block or (min(_next_pow2(pps), max(1, 128 // ps)) if not interpret else min(_next_pow2(pps), 16))
  if num_splits is None:  # enough programs to fill a GPU's SMs; one split when interpreted
    num_splits = 1 if interpret else max(1, min(-(-264 // (B * K)), -(-pps // pb)))
  per_split = -(-pps // (pb * num_splits)) * pb
  table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, per_split * num_splits - pps)))
  qg = jnp.pad(q.reshape(B, K, G, D), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
  pages = pl.BlockSpec((None, P, ps, Dk), lambda b, h, s: (h, 0, 0, 0))
  in_specs = [pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0)), pages, pages]
  args = [qg, k_pages, v_pages]
  if quantized:
    scales = pl.BlockSpec((None, P, ps), lambda b, h, s: (h, 0, 0))
    in_specs += [scales, scales]
    args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
  if int4:
    in_specs += [scales, scales]
    args += [k_zeros.astype(jnp.float32), v_zeros.astype(jnp.float32)]
  in_specs += [pl.BlockSpec((None, per_split), lambda b, h, s: (b, s)), pl.BlockSpec((1,), lambda b, h, s: (b,))]
  args += [table, lengths.astype(jnp.int32)]
  out_specs = [pl.BlockSpec((None, None, None, Gp, D), lambda b, h, s: (b, h, s, 0, 0)),
               pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0)),
               pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0))]
  out_shape = [jax.ShapeDtypeStruct((B, K, num_splits, Gp, D), jnp.float32),
               jax.ShapeDtypeStruct((B, K, num_splits, Gp), jnp.float32),
               jax.ShapeDtypeStruct((B, K, num_splits, Gp), jnp.float32)]
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
  st = _Static(pages_per_block=pb, pages_per_split=per_split, quantized=quantized, interpret=bool(interpret),
               int4=int4)
  acc, m, l = pl.pallas_call(functools.partial(_kernel, st=st), grid=(B, K, num_splits), in_specs=in_specs,
                             out_specs=out_specs, out_shape=out_shape, interpret=interpret, name="paged_attention",
                             **kwargs)(*args)
  # Merge the splits' partial softmax states; an empty split has l = 0 and weight exp(NEG_INF - m) = 0.
  m_all = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - m_all)
  l_all = jnp.sum(w * l, axis=2)
  out = jnp.sum(w[..., None] * acc, axis=2) / jnp.where(l_all == 0.0, 1.0, l_all)[..., None]
  return out[:, :, :G].reshape(B, H, D).astype(q.dtype)


__all__ = ["paged_attention", "paged_attention_reference", "quantize_kv", "quantize_kv_int4"]
