"""int8-weight matmul on XLA:CPU through a native FFI kernel (qmatmul.cc), for the serving engine.

Shapes: x [..., K] float32, w an `Int8Weight` (a per-output-channel int8 weight [N, K] with scale [N], i.e. a
quant.QArray kept whole, packed once by `pack` into the kernel's panel layout) -> y [..., N] float32.

XLA:CPU does not fuse an int8 -> float convert into a dot, so the pure-JAX path (dequantize, then dot) reads and
writes a float copy of every weight; the kernel streams the int8 weight once. Rows of x below `vnni_min_rows`
take the exact kernel (int8 -> float in registers, float FMA); more rows take the VNNI kernel, which quantizes
x to int8 per block of BLOCK = 128 (error bound in qmatmul.cc and `vnni_error_bound`). Disable with INTERNLM_JAX_NATIVE=0.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.native import build

_TARGET = "internlm_jax_qmatmul_i8"
BLOCK = 128  # activations per int8 scale in the VNNI kernel (kBlock in qmatmul.cc)
# Rows of x from which the VNNI kernel runs. Measured on a 2-core Sapphire Rapids (125M model, batch-1 int8
# decode): VNNI 120-125 tok/s, exact 90 (the exact kernel is compute bound), so VNNI from one row. A huge value
# (INTERNLM_JAX_NATIVE_VNNI_MIN_ROWS) keeps the exact kernel everywhere, e.g. to reproduce the pure-JAX tokens.
VNNI_MIN_ROWS = 1
_state: dict[str, object] = {}


LANES = 16  # output rows per packed panel (kLanes in qmatmul.cc: one zmm register)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "scale"], meta_fields=["n", "k"])
@dataclasses.dataclass
class Int8Weight:
  """An int8 weight [n, k] in the kernel's packed layout (see qmatmul.cc): panels of 16 output rows, k padded
  to a multiple of BLOCK, each group of 4 along k stored as 16 rows x 4 bytes, + 128 (uint8). One float scale
  per output row and group of k / G consecutive inputs (G = 1: per output channel). Build with `pack`; `q` and
  `astype` give back the [n, k] int8 and dequantized weights."""
  packed: jax.Array  # [ceil(n / 16), kp * 16] uint8
  scale: jax.Array   # [G, ceil(n / 16) * 16] float32 (zero past n)
  n: int
  k: int

  @property
  def shape(self) -> tuple[int, int]:
    return (self.n, self.k)

  @property
  def q(self) -> jax.Array:
    """The int8 weight [n, k]."""
    panels, width = self.packed.shape
    kp = width // LANES
    rows = self.packed.reshape(panels, kp // 4, LANES, 4).transpose(0, 2, 1, 3).reshape(panels * LANES, kp)
    return (rows[:self.n, :self.k].astype(jnp.int32) - 128).astype(jnp.int8)

  def astype(self, dtype) -> jax.Array:
    groups = self.scale.shape[0]
    scale = jnp.repeat(self.scale[:, :self.n].T, self.k // groups, axis=1)  # [n, k]
    return self.q.astype(dtype) * scale.astype(dtype)


def group_ok(group: int, k: int) -> bool:
  """Whether the kernel takes one scale per `group` consecutive inputs of a k-long row."""
  return group == k or (k % group == 0 and group % 4 == 0 and (BLOCK % group == 0 or group % BLOCK == 0))


def pack(q: jax.Array, scale: jax.Array) -> Int8Weight:
  """int8 q [n, k] and float scales [n] (per row) or [n, G] (per row and group of k / G inputs) -> the packed
  `Int8Weight` (jit-able; done once at load time)."""
  chex.assert_rank(q, 2)
  chex.assert_type([q], [jnp.int8])
  n, k = q.shape
  scale = scale.reshape(n, -1) if scale.ndim == 1 else scale
  if scale.ndim != 2 or scale.shape[0] != n or not group_ok(k // scale.shape[1], k) or k % scale.shape[1]:
    raise ValueError(f"qmatmul.pack: scale {scale.shape} for q {q.shape}: want [n] or [n, G] with k / G a "
                     f"multiple of 4 that divides {BLOCK} or is a multiple of it")
  npad, kpad = -n % LANES, -k % BLOCK
  u = jnp.pad(q.astype(jnp.int32) + 128, [(0, npad), (0, kpad)], constant_values=128).astype(jnp.uint8)
  panels, kp = (n + npad) // LANES, k + kpad
  packed = u.reshape(panels, LANES, kp // 4, 4).transpose(0, 2, 1, 3).reshape(panels, kp * LANES)
  return Int8Weight(packed, jnp.pad(scale.astype(jnp.float32).T, [(0, 0), (0, npad)]), n, k)


def concat(weights: list[Int8Weight]) -> Int8Weight:
  """The weights' output rows stacked (one call instead of several on the same input): [sum n, k]."""
  q = jnp.concatenate([w.q for w in weights], axis=0)
  return pack(q, jnp.concatenate([w.scale[:, :w.n].T for w in weights], axis=0))


def enabled_by_env() -> bool:
  return os.environ.get("INTERNLM_JAX_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def available() -> bool:
  """Whether the native kernel can run here: enabled, CPU backend, built, loaded and supported by this CPU.
  The first failure is reported once as a warning; the caller then keeps the pure-JAX path."""
  if not enabled_by_env() or jax.default_backend() != "cpu":
    return False
  return build.register("qmatmul", {_TARGET: "InternlmQMatmulI8"}, _state)


def vnni_min_rows() -> int:
  return int(os.environ.get("INTERNLM_JAX_NATIVE_VNNI_MIN_ROWS", VNNI_MIN_ROWS))


def qmatmul(x: jax.Array, w: Int8Weight, *, min_rows: int | None = None) -> jax.Array:
  """x [..., K] float32 @ w.T -> [..., N] float32 on the native kernel (call `available()` first). `min_rows`:
  rows of x from which the VNNI kernel runs (default `vnni_min_rows()`; a huge value forces the exact one)."""
  chex.assert_rank([w.packed, w.scale], [2, 2])
  chex.assert_type([x, w.packed, w.scale], [jnp.float32, jnp.uint8, jnp.float32])
  N, K = w.shape
  if x.shape[-1] != K:
    raise ValueError(f"qmatmul: x {x.shape} against an int8 weight [{N}, {K}]")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, K)
  rows = vnni_min_rows() if min_rows is None else min_rows
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], N), jnp.float32))
  return call(x2, w.packed, w.scale, n_out=np.int64(N), vnni_min_rows=np.int64(rows)).reshape(*lead, N)


def reference(x: jax.Array, w: Int8Weight) -> jax.Array:
  """The pure-JAX product the kernel computes: dequantize, then dot."""
  return jnp.einsum("...k,nk->...n", x, w.astype(jnp.float32), precision="highest")


def vnni_error_bound(x: jax.Array, w: Int8Weight) -> jax.Array:
  """[..., N] bound on |VNNI kernel - exact|: x is rounded per block of BLOCK along K to steps of the block's
  max |x| / 127, so each product is off by at most half its block's step times |w|."""
  K = x.shape[-1]
  pad = -K % BLOCK
  xb = jnp.pad(jnp.abs(x), [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, BLOCK)
  wb = jnp.pad(jnp.abs(w.astype(jnp.float32)), [(0, 0), (0, pad)]).reshape(w.shape[0], -1, BLOCK)
  half_step = jnp.max(xb, axis=-1) / 254.0  # [..., blocks]
  return jnp.einsum("...b,nb->...n", half_step, jnp.sum(wb, axis=-1), precision="highest")
