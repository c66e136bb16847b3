"""cuDNN fused attention on GPUs (through `jax.nn.dot_product_attention`) for forwards without a KV cache.

Shapes: B batch, T tokens (= key slots), K kv heads, G query heads per kv head, D head_dim.
  q [B, T, K, G, D]    k, v [B, T, K, D]    q_segment_ids, kv_segment_ids [B, T] int32    out [B, T, K, G, D]

Why it exists: on an H200 cuDNN's flash attention ran 2-4x faster than our Pallas/Triton kernel (bf16, D = 128,
fwd+bwd at T = 4096: 439 against 137 causal TFLOP/s; BENCHMARKS.md), and attention is a third of the 1.8B step.
Causality is cuDNN's own mask, so the upper triangle is skipped. Packed documents add a segment mask, which jax
hands cuDNN as an additive bias [B, 1, T, T] (one read of it per head, and a bias gradient it computes and we
drop); without segment ids there is no bias at all.

Contract: `xla_attention`'s, for a forward without a KV cache where key slot s holds the token at q_index s, i.e.
q_index[b, t] == t (what `model.hidden_states` passes; the model switches to `xla` when it decodes from a cache).
Where cuDNN cannot run (not a GPU, float32 inputs, a head_dim it refuses) the same call runs jax's XLA version.
"""
from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp

from internlm_jax.attention import register_attention

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_supported(dtype, head_dim: int, seq_len: int = 2, with_bias: bool = False, backend: str | None = None,
                    compute_capability: float | None = None) -> bool:
  """jax's own checks for cuDNN's flash kernel (fused_attention_stablehlo.check_is_flash_attention), made before
  tracing so that a refused shape falls back instead of failing: a GPU, fp16/bf16 operands, a head_dim that is a
  multiple of 8 up to 256 from Hopper on (128 before), and with a bias (packed segments) an even length."""
  backend = backend or jax.default_backend()
  if backend != "gpu" or jnp.dtype(dtype) not in map(jnp.dtype, CUDNN_DTYPES):
    return False
  if compute_capability is None:
    compute_capability = float(getattr(jax.devices()[0], "compute_capability", "0") or 0)
  max_head_dim = 256 if compute_capability >= 9.0 else 128
  return head_dim % 8 == 0 and head_dim <= max_head_dim and not (with_bias and seq_len % 2)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """q [B, T, K, G, D], k/v [B, T, K, D] -> [B, T, K, G, D] in q.dtype; see the module docstring."""
  chex.assert_rank([q, k, v, q_index], [5, 4, 4, 2])
  B, T, K, G, D = q.shape
  chex.assert_shape([k, v], (B, T, K, D))
  del q_index  # causal by position: the contract says q_index[b, t] == t
  mask = None
  if q_segment_ids is not None and kv_segment_ids is not None:
    chex.assert_shape([q_segment_ids, kv_segment_ids], (B, T))
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
  implementation = "cudnn" if cudnn_supported(q.dtype, D, T, mask is not None) else "xla"
  if implementation == "xla":
    _warn_once(f"cudnn attention cannot run for {jnp.dtype(q.dtype).name} head_dim {D} length {T} on "
               f"{jax.default_backend()}; using jax's XLA attention (scores in memory: T x T per head)")
  # Query head k * G + g reads kv head k, the grouping jax.nn.dot_product_attention uses for N = K * G heads.
  out = jax.nn.dot_product_attention(q.reshape(B, T, K * G, D), k, v, mask=mask, is_causal=True,
                                     implementation=implementation)
  return out.reshape(B, T, K, G, D)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    warnings.warn(message, stacklevel=3)


register_attention("cudnn", cudnn_attention)

__all__ = ["cudnn_attention", "cudnn_supported"]
