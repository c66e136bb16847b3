"""float32 matmul for serving on XLA:CPU through a native FFI kernel (fmatmul.cc).

Shapes: x [..., K] float32, w an `F32Weight` (a float32 weight [N, K], row n = output channel n, packed once
by `pack` into strips of 64 output channels, each [K, 64]) -> y [..., N] float32. The serving engine uses it
for every float32 weight on one CPU device: decode steps (1 to a few dozen rows, where XLA:CPU's small-M dots
run far below the FMA peak) and prefill chunks alike. Each output is one k-ordered FMA accumulation, whatever
the number of rows, so a sequence's logits do not depend on which rows share its step. Disable with
INTERNLM_JAX_NATIVE=0.
"""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.native import build, qmatmul

_TARGET = "internlm_jax_fmatmul"
WIDTH = 64  # output channels per packed strip (kWidth in fmatmul.cc)
_state: dict[str, object] = {}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed"], meta_fields=["n"])
@dataclasses.dataclass
class F32Weight:
  """A float32 serving weight [n, k] in the kernel's packed layout: strips of 64 output channels, each [k, 64]
  (zero past n): set by serve.paged_model.serving_params on one CPU device, where the kernel runs. Build with
  `pack`; `astype` gives back the [n, k] weight."""
  packed: jax.Array  # [ceil(n / 64), k, 64] float32
  n: int

  @property
  def shape(self) -> tuple[int, int]:
    return (self.n, self.packed.shape[1])

  def astype(self, dtype) -> jax.Array:
    strips, k, width = self.packed.shape
    return self.packed.transpose(0, 2, 1).reshape(strips * width, k)[:self.n].astype(dtype)


def pack(w: jax.Array) -> F32Weight:
  """A float32 weight [n, k] (row n = output channel n) -> the packed `F32Weight` (jit-able; done at load)."""
  chex.assert_rank(w, 2)
  chex.assert_type([w], [jnp.float32])
  n, k = w.shape
  strips = -(-n // WIDTH)
  padded = jnp.pad(w, [(0, strips * WIDTH - n), (0, 0)])
  return F32Weight(padded.reshape(strips, WIDTH, k).transpose(0, 2, 1), n)


def linear(x: jax.Array, w: F32Weight) -> jax.Array:
  """x [..., K] @ w.T on the kernel for float32 x; other dtypes take XLA's dot on the unpacked weight."""
  if x.dtype == jnp.float32:
    return fmatmul(x, w)
  return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))


def available() -> bool:
  """Whether the kernel can run here (enabled, CPU backend, built, supported); the first failure warns once."""
  if not qmatmul.enabled_by_env() or jax.default_backend() != "cpu":
    return False
  return build.register("fmatmul", {_TARGET: "InternlmFMatmul"}, _state)


def fmatmul(x: jax.Array, w: F32Weight) -> jax.Array:
  """x [..., K] @ w.T -> [..., N], float32 (call `available()` first)."""
  chex.assert_rank(w.packed, 3)
  chex.assert_type([x, w.packed], [jnp.float32, jnp.float32])
  N, K = w.shape
  if x.shape[-1] != K:
    raise ValueError(f"fmatmul: x {x.shape} against a float32 weight [{N}, {K}]")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, K)
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], N), jnp.float32))
  return call(x2, w.packed, n_out=np.int64(N)).reshape(*lead, N)
