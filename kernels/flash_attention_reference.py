"""Pure-JAX reference for kernels/flash_attention.py: the definition the kernel is tested against.

Shapes: B batch, T query tokens, S key/value slots, K kv heads, G query heads per kv head, D head_dim.

Query t sits at kv slot q_index[b, t]; with `causal` it sees slots s <= q_index[b, t]. With both segment arrays
it sees only slots of its own segment. A row that sees nothing returns zeros (the kernel's convention; the "xla"
dispatch reference instead averages every value there, a case real packed batches never produce).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def default_q_index(batch: int, q_len: int, kv_len: int) -> jax.Array:
  """Queries are the last T of the S slots: arange(T) for self-attention, offset for a prefill after a cache."""
  return jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len), (batch, q_len))


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array | None = None,
                        q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None, *,
                        causal: bool = True) -> jax.Array:
  """q [B, T, K, G, D], k/v [B, S, K, D] -> [B, T, K, G, D] in q.dtype; float32 softmax and accumulation."""
  B, T, _, _, D = q.shape
  S = k.shape[1]
  if q_index is None:
    q_index = default_q_index(B, T, S)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * D ** -0.5
  mask = jnp.ones((B, T, S), bool)
  if causal:
    mask &= jnp.arange(S, dtype=jnp.int32)[None, None, :] <= q_index[:, :, None]
  if q_segment_ids is not None and kv_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  mask = mask[:, None, None]
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)
