"""Pure-JAX reference for kernels/paged_attention.py: gather every page, mask by length, dense softmax.

Shapes: B batch, H query heads, K kv heads, G = H / K, D head_dim, P pages in the pool, ps page_size,
pps pages per sequence (page-table width), S = pps * ps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-token int8: x [..., D] -> (int8 [..., D], float32 scale [...]) with x ~= q * scale."""
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
  scale = jnp.where(scale == 0.0, 1.0, scale)
  return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                              lengths: jax.Array, k_scales: jax.Array | None = None,
                              v_scales: jax.Array | None = None) -> jax.Array:
  """q [B, H, D], pages [K, P, ps, D] (int8 with scales [K, P, ps]), page_table [B, pps], lengths [B] -> [B, H, D]."""
  B, H, D = q.shape
  K, P, ps, _ = k_pages.shape
  pps = page_table.shape[1]
  ids = jnp.clip(page_table, 0, P - 1)  # stale slots beyond a sequence's length may hold anything
  valid = (jnp.arange(pps * ps)[None, :] < lengths[:, None])[:, None, :]  # [B, 1, S]

  def dense(pages, scales):  # -> [B, K, S, D] float32, zero outside the sequence
    x = pages[:, ids].astype(jnp.float32)  # [K, B, pps, ps, D]
    if scales is not None:
      x = x * scales[:, ids][..., None]
    x = x.transpose(1, 0, 2, 3, 4).reshape(B, K, pps * ps, D)
    return jnp.where(valid[..., None], x, 0.0)

  k, v = dense(k_pages, k_scales), dense(v_pages, v_scales)
  qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
  s = jnp.einsum("bkgd,bksd->bkgs", qg, k) * D ** -0.5
  s = jnp.where(valid[:, :, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(valid[:, :, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkgs,bksd->bkgd", p / jnp.where(l == 0, 1.0, l), v)
  return out.reshape(B, H, D).astype(q.dtype)
