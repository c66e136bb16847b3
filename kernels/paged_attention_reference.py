"""Pure-JAX reference for kernels/paged_attention.py: gather every page, mask by length, dense softmax; and the
KV quantizers the serving cache stores pages with.

Shapes: B batch, H query heads, K kv heads, G = H / K, D head_dim, P pages in the pool, ps page_size,
pps pages per sequence (page-table width), S = pps * ps.
  int8 pages [K, P, ps, D] int8 with scales [K, P, ps] float32 (symmetric: x ~= q * scale)
  int4 pages [K, P, ps, D // 2] uint8 with scales and zeros [K, P, ps] float32 (asymmetric: x ~= q * scale + zero,
  q in 0..15); byte j of a token holds element j in its low nibble and element j + D / 2 in its high one
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-token int8: x [..., D] -> (int8 [..., D], float32 scale [...]) with x ~= q * scale."""
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
  scale = jnp.where(scale == 0.0, 1.0, scale)
  return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale


def quantize_kv_int4(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Asymmetric per-token int4, as LMDeploy's online KV int4: x [..., D] -> (uint8 [..., D // 2] two values a
  byte, float32 scale [...], float32 zero [...]) with q = round((x - min) / scale) in 0..15, scale = (max - min)
  / 15, zero = min, so x ~= q * scale + zero. Packing halves (not neighbours) lets a kernel unpack with a mask
  and a shift into two contiguous [.., D / 2] tiles, each one dot, without interleaving lanes."""
  D = x.shape[-1]
  if D % 2:
    raise ValueError(f"int4 KV packs two values a byte along head_dim, which must be even; got {D}")
  x32 = x.astype(jnp.float32)
  lo, hi = jnp.min(x32, axis=-1), jnp.max(x32, axis=-1)
  scale = (hi - lo) / 15.0
  scale = jnp.where(scale == 0.0, 1.0, scale)  # a constant row: every q is 0 and dequantizes to lo exactly
  q = jnp.clip(jnp.round((x32 - lo[..., None]) / scale[..., None]), 0, 15).astype(jnp.uint8)
  packed = q[..., :D // 2] | (q[..., D // 2:] << 4)
  chex.assert_shape([scale, lo], x.shape[:-1])
  return packed, scale, lo


def unpack_int4(packed: jax.Array) -> jax.Array:
  """uint8 [..., D // 2] -> the nibbles as uint8 [..., D] in element order (see quantize_kv_int4)."""
  return jnp.concatenate([packed & 0xF, packed >> 4], axis=-1)


def dequantize_kv_int4(packed: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """uint8 [..., D // 2], scale and zero [...] -> float32 [..., D]: q * scale + zero."""
  chex.assert_equal_shape([scale, zero])
  chex.assert_shape(scale, packed.shape[:-1])
  return unpack_int4(packed).astype(jnp.float32) * scale[..., None] + zero[..., None]


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                              lengths: jax.Array, k_scales: jax.Array | None = None,
                              v_scales: jax.Array | None = None, k_zeros: jax.Array | None = None,
                              v_zeros: jax.Array | None = None) -> jax.Array:
  """q [B, H, D], pages [K, P, ps, D] (int8 with scales [K, P, ps]; or packed int4 [K, P, ps, D // 2] with scales
  and zeros [K, P, ps]), page_table [B, pps], lengths [B] -> [B, H, D]."""
  B, H, D = q.shape
  K, P, ps = k_pages.shape[:3]
  pps = page_table.shape[1]
  ids = jnp.clip(page_table, 0, P - 1)  # stale slots beyond a sequence's length may hold anything
  valid = (jnp.arange(pps * ps)[None, :] < lengths[:, None])[:, None, :]  # [B, 1, S]

  def dense(pages, scales, zeros):  # -> [B, K, S, D] float32, zero outside the sequence
    if zeros is not None:
      x = dequantize_kv_int4(pages[:, ids], scales[:, ids], zeros[:, ids])  # [K, B, pps, ps, D]
    else:
      x = pages[:, ids].astype(jnp.float32)  # [K, B, pps, ps, D]
      if scales is not None:
        x = x * scales[:, ids][..., None]
    x = x.transpose(1, 0, 2, 3, 4).reshape(B, K, pps * ps, D)
    return jnp.where(valid[..., None], x, 0.0)

  k, v = dense(k_pages, k_scales, k_zeros), dense(v_pages, v_scales, v_zeros)
  qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
  s = jnp.einsum("bkgd,bksd->bkgs", qg, k) * D ** -0.5
  s = jnp.where(valid[:, :, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(valid[:, :, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkgs,bksd->bkgd", p / jnp.where(l == 0, 1.0, l), v)
  return out.reshape(B, H, D).astype(q.dtype)
