"""Pallas paged decode attention (interpret mode on CPU) against the reference, with NaN-poisoned unused memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.attention import xla_attention
from kernels.paged_attention import paged_attention, paged_attention_reference, quantize_kv, quantize_kv_int4
from kernels.paged_attention_reference import dequantize_kv_int4

reference = jax.jit(paged_attention_reference)  # eager, its many small ops each compile: slower
quantize4, dequantize4 = jax.jit(quantize_kv_int4), jax.jit(dequantize_kv_int4)

PS = 8  # page size
# Lengths cover: one token, exactly one page, page boundary - 1 / + 1, several pages, an empty sequence.
LENGTHS = [1, PS, PS - 1, PS + 1, 3 * PS + 5, 0]


def paged_cache(seed, lengths, K, D, pps, num_pages, dtype=jnp.float32):
  """Pages filled only where a sequence has tokens; every other value (unused pages, the tail of each last page)
  is NaN, and table slots past a sequence's pages point at a NaN page or out of the pool."""
  rng = np.random.default_rng(seed)
  k = np.full((K, num_pages, PS, D), np.nan, np.float32)
  v = np.full_like(k, np.nan)
  table = np.zeros((len(lengths), pps), np.int32)
  free = list(rng.permutation(np.arange(1, num_pages)))  # page 0 stays NaN: a tempting target for stale slots
  for b, n in enumerate(lengths):
    used = -(-n // PS)
    for j in range(used):
      page = free.pop()
      table[b, j] = page
      live = min(PS, n - j * PS)
      k[:, page, :live] = rng.normal(size=(K, live, D))
      v[:, page, :live] = rng.normal(size=(K, live, D))
    table[b, used:] = rng.choice([0, num_pages + 3, -7], size=pps - used)
  return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(table), jnp.asarray(lengths, jnp.int32)


def fast_jit(fn, *args, **static):
  """Interpret-mode kernels compile about twice as fast without XLA's backend optimizations."""
  return jax.jit(lambda *a: fn(*a, **static)).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})(*args)


def assert_close(got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), "a NaN page leaked into the output"
  err = np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want))))
  assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("G,dtype,pages_per_block,num_splits", [
    pytest.param(1, jnp.float32, 1, 1, id="g1-f32"),
    pytest.param(4, jnp.float32, 2, 3, id="g4-f32-splits"),
    pytest.param(8, jnp.bfloat16, 4, 2, id="g8-bf16-splits"),
])
def test_matches_reference_and_ignores_poisoned_memory(G, dtype, pages_per_block, num_splits):
  K, D, pps = 2, 16, 5
  k, v, table, lengths = paged_cache(G, LENGTHS, K, D, pps, num_pages=24, dtype=dtype)
  q = jax.random.normal(jax.random.key(G), (len(LENGTHS), K * G, D), jnp.float32).astype(dtype)
  out = fast_jit(paged_attention, q, k, v, table, lengths, pages_per_block=pages_per_block, num_splits=num_splits)
  want = reference(q.astype(jnp.float32), k, v, table, lengths)
  assert out.shape == q.shape and out.dtype == dtype
  assert_close(out, want, 1e-5 if dtype == jnp.float32 else 2e-2)
  assert np.all(np.asarray(out[-1]) == 0), "an empty sequence attends to nothing"


def test_int8_kv_with_per_token_scales():
  K, G, D, pps = 2, 2, 16, 5
  k, v, table, lengths = paged_cache(11, LENGTHS, K, D, pps, num_pages=24)
  (kq, ks), (vq, vs) = quantize_kv(jnp.nan_to_num(k)), quantize_kv(jnp.nan_to_num(v))
  poison = jnp.isnan(k[..., 0])  # int8 cannot hold NaN: poison the unused pages' scales instead
  ks, vs = jnp.where(poison, jnp.nan, ks), jnp.where(poison, jnp.nan, vs)
  q = jax.random.normal(jax.random.key(1), (len(LENGTHS), K * G, D), jnp.float32)
  out = fast_jit(paged_attention, q, kq, vq, table, lengths, ks, vs, pages_per_block=2, num_splits=2)
  assert_close(out, reference(q, kq, vq, table, lengths, ks, vs), 1e-5)
  # Dequantization error against the float cache stays small.
  assert_close(out, reference(q, k, v, table, lengths), 5e-2)


def test_int4_kv_with_scales_and_zero_points():
  K, G, D, pps = 2, 2, 32, 5  # D / 2 = 16: the half-width dots stay within what Triton compiles on a GPU
  k, v, table, lengths = paged_cache(12, LENGTHS, K, D, pps, num_pages=24)
  (kq, ks, kz), (vq, vs, vz) = quantize4(jnp.nan_to_num(k)), quantize4(jnp.nan_to_num(v))
  assert kq.shape == (K, 24, PS, D // 2) and kq.dtype == jnp.uint8
  poison = jnp.isnan(k[..., 0])  # packed bytes cannot hold NaN: poison the unused pages' scales and zeros
  ks, vs, kz, vz = [jnp.where(poison, jnp.nan, x) for x in (ks, vs, kz, vz)]
  q = jax.random.normal(jax.random.key(2), (len(LENGTHS), K * G, D), jnp.float32)
  out = fast_jit(paged_attention, q, kq, vq, table, lengths, ks, vs, kz, vz, pages_per_block=2, num_splits=2)
  assert_close(out, reference(q, kq, vq, table, lengths, ks, vs, kz, vz), 1e-5)  # measured 5e-7
  # 16 levels per token over a normal(0, 1) head of 32: measured 0.060 against the float pages.
  assert_close(out, reference(q, k, v, table, lengths), 0.15)
  with pytest.raises(ValueError, match="k_zeros and v_zeros"):
    paged_attention(q, kq, vq, table, lengths, ks, vs, kz, None)


def test_int4_quantizer_round_trip_packing_and_degenerate_rows():
  x = np.random.default_rng(3).normal(size=(3, 5, 64)).astype(np.float32) * np.float32([0.1, 1, 30])[:, None, None]
  packed, scale, zero = quantize4(x)
  assert packed.shape == (3, 5, 32) and packed.dtype == jnp.uint8 and scale.shape == zero.shape == (3, 5)
  scale, zero = np.asarray(scale), np.asarray(zero)
  err = np.abs(np.asarray(dequantize4(packed, scale, zero)) - x)
  assert np.all(err <= scale[..., None] / 2 + 1e-6 * np.abs(x).max(-1, keepdims=True))
  np.testing.assert_array_equal(zero, x.min(-1))
  np.testing.assert_allclose(scale, (x.max(-1) - x.min(-1)) / 15, rtol=1e-6)
  # Byte j: element j in the low nibble, element j + D / 2 in the high one. Both rows of 32 go through one shape.
  rows = np.float32([list(range(16)) * 2, [0] * 16 + [15] * 16])  # row 0: levels equal the values
  packed, scale, zero = map(np.asarray, quantize4(rows))
  assert (scale[0], zero[0]) == (1.0, 0.0)
  assert packed[0].tolist() == [j | (j << 4) for j in range(16)] and packed[1].tolist() == [0xF0] * 16
  # Constant and all-zero tokens: no division by zero, exact round trip.
  flat = np.float32([[2.5] * 32, [0.0] * 32])
  back = np.asarray(dequantize4(*quantize4(flat)))
  assert np.all(np.isfinite(back)) and np.all(back == flat)
  with pytest.raises(ValueError, match="even"):
    quantize_kv_int4(jnp.zeros((2, 7)))


def test_agrees_with_dense_decode_attention():
  # The same step through the model's dense-cache path: q at slot length - 1 over a contiguous buffer.
  K, G, D, pps = 2, 2, 16, 4
  lengths = [5, 17, 32]
  k, v, table, lens = paged_cache(5, lengths, K, D, pps, num_pages=16)
  q = jax.random.normal(jax.random.key(5), (3, K * G, D), jnp.float32)
  dense = lambda pages: jnp.nan_to_num(pages[:, jnp.clip(table, 0, 15)]).transpose(1, 2, 3, 0, 4).reshape(
      3, pps * PS, K, D)
  want = jax.jit(xla_attention)(q.reshape(3, 1, K, G, D), dense(k), dense(v), (lens - 1)[:, None])
  out = fast_jit(paged_attention, q, k, v, table, lens)
  assert_close(out, want.reshape(3, K * G, D), 1e-5)
