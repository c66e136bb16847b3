"""The SwiGLU MLP of a QLoRA layer (NF4 base with LoRA on w1, w3 and w2), computed a group of hidden units at a
time, with a hand-written backward: Unsloth's fused LoRA MLP, for XLA.

Shapes (one layer: the layer scan has sliced the lead axis away): N = B * T tokens, E embed, F mlp hidden,
k groups of G = F / k hidden units, r LoRA rank, s1 / s3 / s2 the adapters' scales.
  w1, w3  base NF4 [E, F], a [E, r], b [r, F]         w2  base NF4 [F, E], a [F, r], b [r, E]
  gate_g = x W1[:, g] + s1 (x a1) b1[:, g]            [N, G]   (up_g likewise with w3)
  h_g    = silu(gate_g) * up_g                        [N, G]
  out    = sum_g h_g W2[g, :] + s2 (sum_g h_g a2[g, :]) b2     [N, E]

Why. Through `layers.mlp` and `LoraWeight.project`, gate, up, the hidden units, their LoRA deltas and all their
cotangents are [N, F] buffers: eleven [512, 2816] float32 ones (60 MiB) were live at once in a layer's backward,
the peak of the 331M QLoRA step (BENCHMARKS.md). Here no [N, F] value exists: each exists one [N, G] group at a
time, in the forward and in the backward, and each group of W1 / W3 columns and W2 rows is decoded from NF4 just
before it is used (about DECODE_GROUP_ELEMS elements). The backward's only activation residual is x: it recomputes
gate and up group by group. So under full remat the recomputed forward of this MLP feeds nothing and XLA drops it:
each NF4 weight is decoded twice a step instead of three times, and the MLP runs 8 matmul passes instead of 9.

Exact up to summation order: the contraction over F is summed group by group, in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from internlm_jax import quant_nf4_ops
from internlm_jax.layers import swiglu_hidden
from internlm_jax.quant_nf4 import QuantizedWeight
from internlm_jax.quant_nf4_ops import _decode_after, _decode_columns, _decode_rows, _zero_cotangent

F32 = jnp.float32


def group_count(embed: int, hidden: int, block: int) -> int | None:
  """The fewest groups k of the F hidden units with at most DECODE_GROUP_ELEMS weight elements per group and
  whole NF4 blocks (G % block == 0); None when F has no such split."""
  fewest = max(1, -(-embed * hidden // quant_nf4_ops.DECODE_GROUP_ELEMS))
  for k in range(fewest, hidden + 1):
    if hidden % k == 0 and (hidden // k) % block == 0:
      return k
  return None


def _is_nf4_lora(w) -> bool:
  base = getattr(w, "base", None)
  return (isinstance(base, QuantizedWeight) and base.kind == "nf4" and not base.lead and hasattr(w, "a")
          and getattr(w, "n_out", None) == 1 and not (w.dropout_key is not None and w.dropout > 0))


def fusable(w1, w3, w2) -> bool:
  """True when w1, w3, w2 are LoRA weights over per-layer NF4 bases (no active dropout) that split into groups,
  and no tensor-parallel mesh axis shards the hidden units (a group slice would gather them)."""
  if not all(_is_nf4_lora(w) for w in (w1, w3, w2)):
    return False
  (e, f), (e3, f3), (f2, e2) = w1.base.inner_shape, w3.base.inner_shape, w2.base.inner_shape
  if (e, f) != (e3, f3) or (f, e) != (f2, e2):
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty and dict(mesh.shape).get("tensor", 1) > 1:
    return False
  k = group_count(e, f, max(w.base.block for w in (w1, w3, w2)))
  return k is not None and all((f // k) % w.base.block == 0 for w in (w1, w3, w2))


def _sizes(w1, w3, w2):
  """(E, F, k groups, G units per group), as `fusable` chose them."""
  e, f = w1.base.inner_shape
  k = group_count(e, f, max(w.base.block for w in (w1, w3, w2)))
  return e, f, k, f // k


def _columns(arr, start, size):
  return jax.lax.dynamic_slice_in_dim(arr, start, size, axis=1)


def _rows(arr, start, size):
  return jax.lax.dynamic_slice_in_dim(arr, start, size, axis=0)


def _projected(x2, w, late, levels, down, j, size, dtype):
  """(x W[:, g] + s (x a) b[:, g], the decoded W[:, g]) for group j of a column-split weight (w1 or w3)."""
  e, f = w.base.inner_shape
  w_g = _decode_columns(late, j * size, size, e, f, dtype, levels)             # [E, G]
  base = jnp.dot(x2, w_g)
  delta = jnp.dot(down, _columns(w.b, j * size, size).astype(dtype))          # [N, G]
  return base + (w.scale * delta).astype(base.dtype), w_g


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_qlora_mlp(x: jax.Array, w1, w3, w2, dtype) -> jax.Array:
  """layers.mlp(x, w1, w3, w2, dtype) for LoRA weights over NF4 bases (see `fusable`); x [..., E] -> [..., E]."""
  e, _, k, size = _sizes(w1, w3, w2)
  x2 = x.reshape(-1, e)
  late1, lv1 = _decode_after(w1.base, x)
  late3, lv3 = _decode_after(w3.base, x)
  late2, lv2 = _decode_after(w2.base, x)
  down1, down3 = jnp.dot(x2, w1.a.astype(dtype)), jnp.dot(x2, w3.a.astype(dtype))

  def group(carry, j):
    acc, down2 = carry
    gate, _ = _projected(x2, w1, late1, lv1, down1, j, size, dtype)
    up, _ = _projected(x2, w3, late3, lv3, down3, j, size, dtype)
    h = swiglu_hidden(gate, up, x.dtype)                                         # [N, G]
    acc = acc + jnp.dot(h, _decode_rows(late2, j, size, e, dtype, lv2), preferred_element_type=F32)
    down2 = down2 + jnp.dot(h, _rows(w2.a, j * size, size).astype(dtype), preferred_element_type=F32)
    return (acc, down2), None

  init = (jnp.zeros((x2.shape[0], e), F32), jnp.zeros((x2.shape[0], w2.a.shape[-1]), F32))
  (acc, down2), _ = jax.lax.scan(group, init, jnp.arange(k))
  base = acc.astype(dtype)
  out = base + (w2.scale * jnp.dot(down2.astype(dtype), w2.b.astype(dtype))).astype(base.dtype)
  return out.reshape(x.shape)


def _fwd(x, w1, w3, w2, dtype):
  return fused_qlora_mlp(x, w1, w3, w2, dtype), (x, w1, w3, w2)  # residuals: inputs only


def _bwd(dtype, residuals, d_out):
  x, w1, w3, w2 = residuals
  e, _, k, size = _sizes(w1, w3, w2)
  x2, g = x.reshape(-1, e), d_out.reshape(-1, e).astype(dtype)
  # Tied to the cotangent: decoded group by group in the loop below, never hoisted nor shared with the forward.
  late1, lv1 = _decode_after(w1.base, d_out)
  late3, lv3 = _decode_after(w3.base, d_out)
  late2, lv2 = _decode_after(w2.base, d_out)
  a1, a3, a2 = (w.a.astype(dtype) for w in (w1, w3, w2))
  down1, down3 = jnp.dot(x2, a1), jnp.dot(x2, a3)
  d_down2 = (w2.scale * jnp.dot(g, w2.b.astype(dtype).T, preferred_element_type=F32)).astype(dtype)  # [N, r]

  def group(carry, j):
    dx, d_down1, d_down3, down2 = carry
    gate, w1_g = _projected(x2, w1, late1, lv1, down1, j, size, dtype)
    up, w3_g = _projected(x2, w3, late3, lv3, down3, j, size, dtype)
    g32, u32 = gate.astype(F32), up.astype(F32)
    sig = jax.nn.sigmoid(g32)
    silu = g32 * sig
    h = (silu * u32).astype(x.dtype)
    a2_g = _rows(a2, j * size, size)                                              # [G, r]
    d_h = (jnp.dot(g, _decode_rows(late2, j, size, e, dtype, lv2).T, preferred_element_type=F32)
           + jnp.dot(d_down2, a2_g.T, preferred_element_type=F32))               # [N, G]
    d_up = (d_h * silu).astype(dtype)
    d_gate = (d_h * u32 * sig * (1.0 + g32 * (1.0 - sig))).astype(dtype)
    down2 = down2 + jnp.dot(h, a2_g, preferred_element_type=F32)
    d_a2 = jnp.dot(h.T, d_down2, preferred_element_type=F32)                      # [G, r]
    d_b1 = w1.scale * jnp.dot(down1.T, d_gate, preferred_element_type=F32)        # [r, G]
    d_b3 = w3.scale * jnp.dot(down3.T, d_up, preferred_element_type=F32)
    d_down1 = d_down1 + w1.scale * jnp.dot(d_gate, _columns(w1.b, j * size, size).astype(dtype).T,
                                           preferred_element_type=F32)
    d_down3 = d_down3 + w3.scale * jnp.dot(d_up, _columns(w3.b, j * size, size).astype(dtype).T,
                                           preferred_element_type=F32)
    dx = dx + jnp.dot(d_gate, w1_g.T, preferred_element_type=F32) + jnp.dot(d_up, w3_g.T,
                                                                            preferred_element_type=F32)
    return (dx, d_down1, d_down3, down2), (d_a2, d_b1, d_b3)

  n, r = x2.shape[0], w2.a.shape[-1]
  init = (jnp.zeros((n, e), F32), jnp.zeros((n, w1.a.shape[-1]), F32), jnp.zeros((n, w3.a.shape[-1]), F32),
          jnp.zeros((n, r), F32))
  (dx, d_down1, d_down3, down2), (d_a2, d_b1, d_b3) = jax.lax.scan(group, init, jnp.arange(k))
  d_down1, d_down3 = d_down1.astype(dtype), d_down3.astype(dtype)
  dx = dx + jnp.dot(d_down1, a1.T, preferred_element_type=F32) + jnp.dot(d_down3, a3.T, preferred_element_type=F32)

  def cotangent(w, d_a, d_b):
    return type(w)(_zero_cotangent(w.base), d_a.astype(w.a.dtype), d_b.astype(w.b.dtype), w.scale, w.n_out,
                   dropout_key=w.dropout_key, dropout=w.dropout)

  rank1, rank3 = w1.b.shape[0], w3.b.shape[0]
  ct1 = cotangent(w1, jnp.dot(x2.T, d_down1, preferred_element_type=F32),
                  jnp.moveaxis(d_b1, 0, 1).reshape(rank1, -1))
  ct3 = cotangent(w3, jnp.dot(x2.T, d_down3, preferred_element_type=F32),
                  jnp.moveaxis(d_b3, 0, 1).reshape(rank3, -1))
  d_b2 = w2.scale * jnp.dot(down2.astype(dtype).T, g, preferred_element_type=F32)        # [r, E]
  ct2 = cotangent(w2, d_a2.reshape(-1, r), d_b2)
  return dx.reshape(x.shape).astype(x.dtype), ct1, ct3, ct2


fused_qlora_mlp.defvjp(_fwd, _bwd)
