"""Attention dispatch: "xla" (the reference), "blockwise" (pure JAX, memory O(T * block)), "pallas" (kernels/).

Shapes: B batch, T query tokens, S key/value slots, K kv heads, G query heads per kv head, D head_dim.
Queries are grouped `[B, T, K, G, D]` so no repeat of keys and values is ever materialized.

Masking is by slot index and segment: query t (at slot index `q_index[b, t]` of the kv buffer) sees slot s when
s <= q_index and the two share a segment id. Full forwards use q_index = arange(T); a decode step uses the cache
length, so unwritten cache slots (s > q_index) are never read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: a row that masks every slot averages the values instead of yielding NaN
# (never the case in practice: every query sees at least its own slot)


def attention_mask(q_index: jax.Array, q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   num_slots: int) -> jax.Array:
  """Boolean [B, T, S]: causal by slot index, restricted to equal segment ids when given."""
  slots = jnp.arange(num_slots, dtype=jnp.int32)
  mask = slots[None, None, :] <= q_index[:, :, None]
  if q_segment_ids is not None and kv_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                  q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """Reference attention. q [B, T, K, G, D], k/v [B, S, K, D] -> [B, T, K, G, D] in q.dtype.

  Scores and softmax in float32 (HF eager semantics), probabilities cast to v's dtype for the value matmul.
  """
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(q_index, q_segment_ids, kv_segment_ids, k.shape[1])
  scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


_IMPLS = {"xla": xla_attention}


def register_attention(name: str, fn) -> None:
  """Adds an implementation with xla_attention's signature (used by the blockwise and Pallas modules)."""
  _IMPLS[name] = fn


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, q_segment_ids: jax.Array | None = None,
           kv_segment_ids: jax.Array | None = None, impl: str = "xla", **impl_options) -> jax.Array:
  """Dispatches to the implementation named by `ModelConfig.attention_impl`."""
  if impl not in _IMPLS:
    _load_impl(impl)
  return _IMPLS[impl](q, k, v, q_index, q_segment_ids, kv_segment_ids, **impl_options)


def _load_impl(impl: str) -> None:
  if impl == "blockwise":
    from internlm_jax import attention_blockwise  # noqa: F401  (registers itself)
  elif impl == "chunked":
    from internlm_jax import attention_chunked  # noqa: F401  (registers itself)
  elif impl == "cudnn":
    from internlm_jax import attention_cudnn  # noqa: F401  (registers itself)
  elif impl == "pallas":
    from kernels import flash_attention  # noqa: F401  (registers itself)
  if impl not in _IMPLS:
    raise ValueError(f"attention_impl {impl!r} is not available; known: {sorted(_IMPLS)}")
