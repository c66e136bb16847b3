"""Elementwise building blocks: RMSNorm, rotary embeddings (with dynamic NTK and linear scaling), SwiGLU.

Shapes: B batch, T tokens, H heads, D head_dim, E embed, F mlp.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from internlm_jax.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in float32, result in x's dtype (as the HF InternLM2 module does)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def rope_base(config: ModelConfig, seq_len: jax.Array | int) -> jax.Array:
  """Rotary base for a sequence of `seq_len` positions: dynamic NTK grows it past max_position_embeddings.

  base' = base * (factor * T / max_pos - (factor - 1)) ** (d / (d - 2)) when T > max_pos, else base.
  `seq_len` may be an array (one length per batch row); the result has its shape.
  """
  base = jnp.asarray(config.rope_theta, jnp.float32)
  seq_len = jnp.asarray(seq_len, jnp.float32)
  if config.rope_scaling_type != "dynamic":
    return jnp.broadcast_to(base, seq_len.shape)
  d = config.head_dim
  factor, max_pos = config.rope_scaling_factor, config.max_position_embeddings
  grown = base * (factor * seq_len / max_pos - (factor - 1.0)) ** (d / (d - 2.0))
  return jnp.where(seq_len > max_pos, grown, base)


def rope_angles(config: ModelConfig, positions: jax.Array, seq_len: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, D/2] in float32 for int positions [B, T]; `seq_len` scalar or [B] sets the NTK base."""
  d = config.head_dim
  base = jnp.broadcast_to(rope_base(config, seq_len), positions.shape[:1])  # [B]
  exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d  # [D/2]
  inv_freq = 1.0 / (base[:, None] ** exponents[None, :])  # [B, D/2]
  t = positions.astype(jnp.float32)
  if config.rope_scaling_type == "linear":
    t = t / config.rope_scaling_factor
  angles = t[:, :, None] * inv_freq[:, None, :]  # [B, T, D/2]
  return _materialized(jnp.cos(angles)), _materialized(jnp.sin(angles))


def _materialized(x: jax.Array) -> jax.Array:
  """x itself, computed once. XLA fuses cos/sin into every consumer, so each layer's rope of q [B, T, H, D]
  would evaluate them again per head and per layer (an optimization_barrier is removed before fusion). A dot
  is never fused into its consumers, and one with the identity is exact: each output is x * 1 plus zeros."""
  n = x.shape[-1]
  return jnp.einsum("...i,ij->...j", x, jnp.eye(n, dtype=x.dtype), precision=jax.lax.Precision.HIGHEST)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on x [B, T, ..., D] with cos/sin [B, T, D/2]; computed in float32, returned in x.dtype."""
  extra = x.ndim - 3
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[-1:])
  sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[-1:])
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_qkv(qkv: jax.Array, q_per_kv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(q [B, T, K, G, D], k [B, T, K, D], v [B, T, K, D]) from the fused projection's qkv [B, T, K, G + 2, D].

  The backward concatenates the three cotangents. Autodiff of the slices pads each one back to qkv's shape and
  adds the pads: XLA:CPU kept two padded [B, T, K, G + 2, D] buffers alive in each layer's backward (4 MiB each
  at the 331M benchmark's shape; the QLoRA step's peak fell 1 MiB). The same numbers: the pads only add zeros."""
  G = q_per_kv
  return qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]


def _split_qkv_fwd(qkv, q_per_kv):
  return split_qkv(qkv, q_per_kv), None


def _split_qkv_bwd(q_per_kv, _, cotangents):
  dq, dk, dv = cotangents
  return (jnp.concatenate([dq, dk[:, :, :, None], dv[:, :, :, None]], axis=3),)


split_qkv.defvjp(_split_qkv_fwd, _split_qkv_bwd)


def project(spec: str, x: jax.Array, w, dtype) -> jax.Array:
  """einsum(spec, x, w) for a projection weight w: an array, a quantized weight (anything with `.astype`), or
  a weight that computes its own product (`w.project`, e.g. a LoRA weight: x W + s (x a) b, never merging)."""
  if hasattr(w, "project"):
    return w.project(spec, x, dtype)
  return jnp.einsum(spec, x, w.astype(dtype))


def mlp(x: jax.Array, w1, w3, w2, dtype) -> jax.Array:
  """The SwiGLU MLP for projection weights of any kind (see `project`), in compute dtype `dtype`."""
  if not any(hasattr(w, "project") for w in (w1, w3, w2)):
    return swiglu(x, w1.astype(dtype), w3.astype(dtype), w2.astype(dtype))
  from internlm_jax import qlora_mlp  # noqa: PLC0415  (it imports this module)
  if qlora_mlp.fusable(w1, w3, w2):  # QLoRA: never an [N, F] buffer, NF4 decoded twice a step, not three times
    return qlora_mlp.fused_qlora_mlp(x, w1, w3, w2, jnp.dtype(dtype))
  gate, up = project("bte,ef->btf", x, w1, dtype), project("bte,ef->btf", x, w3, dtype)
  return project("btf,fe->bte", swiglu_hidden(gate, up, x.dtype), w2, dtype)


def swiglu_hidden(gate, up, dtype):
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)


@jax.custom_vjp
def swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
  """w2(silu(w1 x) * w3 x) for x [B, T, E], w1/w3 [E, F], w2 [F, E]; elementwise math in float32.

  The backward pass is written by hand: autodiff of this block made XLA:CPU copy the [B, T, F] gate gradient
  into a transposed layout inside the silu-derivative fusion, and the MLP's fwd+bwd took 2x its nine matmuls
  (247 ms vs 125 ms at B*T=2048, E=512, F=1536); the hand version is within 1.2x of the matmuls alone.
  """
  return _swiglu_fwd(x, w1, w3, w2)[0]


def _swiglu_fwd(x, w1, w3, w2):
  gate = jnp.einsum("bte,ef->btf", x, w1)
  up = jnp.einsum("bte,ef->btf", x, w3)
  out = jnp.einsum("btf,fe->bte", swiglu_hidden(gate, up, x.dtype), w2)
  return out, (x, w1, w3, w2, gate, up)


def _swiglu_bwd(residuals, d_out):
  x, w1, w3, w2, gate, up = residuals
  g32, u32 = gate.astype(jnp.float32), up.astype(jnp.float32)
  sig = jax.nn.sigmoid(g32)
  silu = g32 * sig
  hidden = (silu * u32).astype(x.dtype)
  d_hidden = jnp.einsum("bte,fe->btf", d_out, w2, preferred_element_type=jnp.float32)
  d_up = (d_hidden * silu).astype(x.dtype)
  d_gate = (d_hidden * u32 * sig * (1.0 + g32 * (1.0 - sig))).astype(x.dtype)
  dx = jnp.einsum("btf,ef->bte", d_gate, w1) + jnp.einsum("btf,ef->bte", d_up, w3)
  dw1 = jnp.einsum("bte,btf->ef", x, d_gate, preferred_element_type=jnp.float32).astype(w1.dtype)
  dw3 = jnp.einsum("bte,btf->ef", x, d_up, preferred_element_type=jnp.float32).astype(w3.dtype)
  dw2 = jnp.einsum("btf,bte->fe", hidden, d_out, preferred_element_type=jnp.float32).astype(w2.dtype)
  return dx.astype(x.dtype), dw1, dw3, dw2


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
