"""Pallas flash attention (interpret mode on CPU) against the pure-JAX reference: forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.attention import xla_attention
from kernels.flash_attention import BlockSizes, flash_attention, kernel_supports, pallas_attention
from kernels.flash_attention_reference import attention_reference

SMALL = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
MIXED = BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)


def ragged_segments(rng, batch, length, max_docs=4):
  """Sorted segment ids per row with random document lengths (a packed batch)."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(0, max_docs), replace=False))
    rows.append(np.searchsorted(cuts, np.arange(length), side="right") + rng.integers(0, 3))
  return jnp.asarray(np.stack(rows), jnp.int32)


def inputs(seed, B, T, S, K, G, D, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, T, K, G, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, K, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, K, D), jnp.float32).astype(dtype)
  cot = jax.random.normal(ks[3], (B, T, K, G, D), jnp.float32).astype(dtype)
  return q, k, v, cot


def compiled(fn, *args):
  """jit with XLA's backend optimizations off: interpret-mode kernels compile about twice as fast, run as fast."""
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def value_and_grads(fn, q, k, v, cot, *extra):
  def both(q, k, v, cot, *extra):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *extra), q, k, v)
    return out, vjp(cot)
  return compiled(both, q, k, v, cot, *extra)


def assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  err = np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want))))
  assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


# (G, T, S, causal, segments, dtype, block sizes, per-row query offset)
CASES = [
    pytest.param(1, 37, 37, True, False, jnp.float32, SMALL, False, id="g1-causal"),
    pytest.param(2, 50, 50, True, True, jnp.float32, MIXED, False, id="g2-causal-segments"),
    pytest.param(4, 33, 33, False, True, jnp.float32, SMALL, False, id="g4-noncausal-segments"),
    pytest.param(6, 13, 45, True, True, jnp.float32, SMALL, True, id="g6-prefill-after-cache-segments"),
    pytest.param(8, 40, 40, True, True, jnp.bfloat16, BlockSizes(32, 16, 32, 16), False, id="bf16-g8-segments"),
    pytest.param(4, 1, 40, True, False, jnp.bfloat16, SMALL, True, id="bf16-g4-decode"),
]


@pytest.mark.parametrize("G,T,S,causal,segments,dtype,blocks,offset", CASES)
def test_forward_and_gradients_match_reference(G, T, S, causal, segments, dtype, blocks, offset):
  B, K, D = 2, 2, 16
  rng = np.random.default_rng(G * 100 + T)
  q, k, v, cot = inputs(G + T, B, T, S, K, G, D, dtype)
  starts = jnp.asarray([S - T, rng.integers(0, S - T + 1) if offset else 0], jnp.int32)
  q_index = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # row 1 follows fewer cached tokens
  seg_q = seg_kv = None
  if segments:
    seg_kv = ragged_segments(rng, B, S)
    seg_q = jnp.take_along_axis(seg_kv, q_index, axis=1)
  if causal:  # one query placed before every key sees nothing: zeros, not NaN, both ways
    q_index = q_index.at[0, 0].set(-1)
  kernel = lambda q, k, v, qi, sq, skv: flash_attention(q, k, v, qi, sq, skv, causal=causal, block_sizes=blocks)
  ref = lambda q, k, v, qi, sq, skv: attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                         v.astype(jnp.float32), qi, sq, skv, causal=causal)
  out, grads = value_and_grads(kernel, q, k, v, cot, q_index, seg_q, seg_kv)
  want, want_grads = value_and_grads(ref, q, k, v, cot.astype(jnp.float32), q_index, seg_q, seg_kv)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert out.dtype == dtype and out.shape == q.shape
  assert_close(out, want, tol, "out")
  if causal:
    assert np.all(np.asarray(out[0, 0]) == 0) and np.all(np.asarray(grads[0][0, 0]) == 0)
  for name, g, w, x in zip("qkv", grads, want_grads, (q, k, v)):
    assert g.dtype == x.dtype
    assert_close(g, w, tol, f"d{name}")


def test_adapter_matches_xla_reference():
  # The dispatch adapter has the xla reference's signature.
  q, k, v, _ = inputs(3, 2, 24, 24, 2, 2, 16, jnp.float32)
  seg = ragged_segments(np.random.default_rng(3), 2, 24)
  q_index = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
  assert_close(compiled(pallas_attention, q, k, v, q_index, seg, seg), xla_attention(q, k, v, q_index, seg, seg),
               1e-5, "packed")


def test_kernel_supports_reports_triton_constraints():
  assert kernel_supports(16, backend="cpu") and kernel_supports(100, backend="cpu")
  assert kernel_supports(128, backend="gpu")
  assert not kernel_supports(96, backend="gpu")
  assert not kernel_supports(128, BlockSizes(block_q=48), backend="gpu")
  assert not kernel_supports(128, backend="tpu")


@pytest.mark.slow
def test_longer_sequences_bf16():
  B, T, K, G, D = 1, 700, 2, 4, 64
  q, k, v, cot = inputs(7, B, T, T, K, G, D, jnp.bfloat16)
  seg = ragged_segments(np.random.default_rng(7), B, T, max_docs=6)
  out, grads = value_and_grads(lambda q, k, v, s: flash_attention(q, k, v, None, s, s), q, k, v, cot, seg)
  up = lambda x: x.astype(jnp.float32)
  want, want_grads = value_and_grads(lambda q, k, v, s: attention_reference(up(q), up(k), up(v), None, s, s),
                                     q, k, v, up(cot), seg)
  assert_close(out, want, 2e-2, "out")
  for g, w in zip(grads, want_grads):
    assert_close(g, w, 2e-2, "grad")
