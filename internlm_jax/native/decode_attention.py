"""Paged decode attention on XLA:CPU through a native FFI kernel (decode_attention.cc), for the serving engine.

Shapes: B batch, H query heads, K kv heads, D head_dim, P pages, ps page_size, pps page-table width.
q [B, H, D] float32; k_pages, v_pages [K, P, ps, D] float32, or int8 with scales [K, P, ps]; page_table [B, pps]
int32; lengths [B] int32 -> [B, H, D] float32: the math of kernels/paged_attention_reference.py, which the
kernel is tested against. The reference gathers dense [B, K, S, D] copies of every sequence's keys and values
and masks them before two small batched dots; the kernel reads each key and value once from its page.
Disable with INTERNLM_JAX_NATIVE=0 (the engine then runs the reference).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from internlm_jax.native import build, qmatmul

_TARGETS = {"internlm_jax_decode_attention_f32": "InternlmDecodeAttentionF32",
            "internlm_jax_decode_attention_i8": "InternlmDecodeAttentionI8"}
MAX_GROUP, MAX_HEAD_DIM = 16, 256  # query heads per kv head and head_dim the kernel holds in registers
_state: dict[str, object] = {}


def available() -> bool:
  """Whether the kernel can run here: enabled, CPU backend, built, loaded and supported by this CPU. The first
  failure is reported once as a warning; the caller then keeps the pure-JAX reference."""
  if not qmatmul.enabled_by_env() or jax.default_backend() != "cpu":
    return False
  return build.register("decode_attention", _TARGETS, _state)


def supports(q: jax.Array, k_pages: jax.Array) -> bool:
  """Whether these operands fit the kernel: float32 queries, float32 or int8 pages, the head shapes it holds."""
  B, H, D = q.shape
  K = k_pages.shape[0]
  return (q.dtype == jnp.float32 and k_pages.dtype in (jnp.float32, jnp.int8) and H % K == 0
          and H // K <= MAX_GROUP and 0 < D <= MAX_HEAD_DIM)


def decode_attention(q, k_pages, v_pages, page_table, lengths, k_scales=None, v_scales=None) -> jax.Array:
  """Attention of one new token per sequence over its pages (call `available()` and `supports()` first)."""
  chex.assert_rank([q, k_pages, v_pages, page_table, lengths], [3, 4, 4, 2, 1])
  chex.assert_equal_shape([k_pages, v_pages])
  quantized = k_pages.dtype == jnp.int8
  if quantized and (k_scales is None or v_scales is None):
    raise ValueError("decode_attention: int8 pages need k_scales and v_scales [K, P, ps]")
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  args = [q, k_pages, v_pages, page_table.astype(jnp.int32), lengths.astype(jnp.int32)]
  if quantized:
    target = "internlm_jax_decode_attention_i8"
    args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
  else:
    target = "internlm_jax_decode_attention_f32"
    args[1:3] = [k_pages.astype(jnp.float32), v_pages.astype(jnp.float32)]
  return jax.ffi.ffi_call(target, out)(*args)
