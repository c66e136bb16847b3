"""float32 matmul for the few rows of a decode step on XLA:CPU through a native FFI kernel (fmatmul.cc).

Shapes: x [..., K] float32, w [N, K] float32 (the serving layout, contraction last) -> y [..., N] float32. The
serving engine uses it for every float32 weight of a decode step on one CPU device (prefill keeps XLA's dot:
many rows are what XLA's GEMM is good at). Each output is one k-ordered accumulation, whatever the number of
rows, so a sequence's logits do not depend on which rows share its step. Disable with INTERNLM_JAX_NATIVE=0.
"""
from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

from internlm_jax.native import build, qmatmul

_TARGET = "internlm_jax_fmatmul"
# Rows up to which `linear` takes the kernel. Measured on 2 cores (125M model): batch-1 decode 62 -> 76 tok/s;
# at 8+ rows XLA's GEMM is as fast or faster (32 rows: 155 GFLOP/s vs the kernel's 92). Below 6 rows XLA:CPU
# switches dot kernels anyway, so rows of decode buckets >= 8 keep XLA's rounding either way.
MAX_ROWS = 4
_state: dict[str, object] = {}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class F32Weight:
  """A float32 serving weight [N, K] (contraction last) marked for the native kernel: set only by
  serve.paged_model.serving_params on one CPU device, where the kernel runs."""
  w: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.w.shape

  def astype(self, dtype) -> jax.Array:
    return self.w.astype(dtype)


def linear(x: jax.Array, w: F32Weight) -> jax.Array:
  """x [..., K] @ w.T: the kernel for float32 x of at most MAX_ROWS rows, XLA's dot otherwise."""
  if x.dtype == jnp.float32 and math.prod(x.shape[:-1]) <= MAX_ROWS:
    return fmatmul(x, w.w)
  return jnp.einsum("...i,oi->...o", x, w.w.astype(x.dtype))


def available() -> bool:
  """Whether the kernel can run here (enabled, CPU backend, built, supported); the first failure warns once."""
  if not qmatmul.enabled_by_env() or jax.default_backend() != "cpu":
    return False
  return build.register("fmatmul", {_TARGET: "InternlmFMatmul"}, _state)


def fmatmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w[N, K].T -> [..., N], float32 (call `available()` first)."""
  chex.assert_rank(w, 2)
  chex.assert_type([x, w], [jnp.float32, jnp.float32])
  N, K = w.shape
  if x.shape[-1] != K:
    raise ValueError(f"fmatmul: x {x.shape} against weight {w.shape}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, K)
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], N), jnp.float32))(x2, w).reshape(*lead, N)
