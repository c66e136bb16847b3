"""Native paged decode attention (XLA FFI, built on first use) against kernels/paged_attention_reference.py, and
the engine's decode through it against the pure-JAX path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.native import decode_attention as native_attention
from internlm_jax.quant import quantize_params
from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.testing import tiny_model
from kernels.paged_attention_reference import paged_attention_reference, quantize_kv


@pytest.fixture
def native(native_ready):
  assert native_attention.available(), native_attention._state.get("error")
  return native_attention


# (B, K, G, D, P, ps, pps): compiled head shapes (G 3 / D 64, G 4 / D 128) and the generic path (G 5, D 20).
SHAPES = [(3, 2, 4, 16, 24, 8, 5), (32, 4, 3, 64, 200, 16, 8), (2, 1, 5, 20, 9, 3, 4), (4, 2, 4, 128, 12, 4, 3)]


def _operands(B, K, G, D, P, ps, pps):
  ks = jax.random.split(jax.random.key(B * D), 5)
  q = jax.random.normal(ks[0], (B, K * G, D))
  k_pages = jax.random.normal(ks[1], (K, P, ps, D)) * 2
  v_pages = jax.random.normal(ks[2], (K, P, ps, D))
  table = jax.random.randint(ks[3], (B, pps), -2, P + 2)  # out-of-range ids are clipped, as in the reference
  lengths = jax.random.randint(ks[4], (B,), 1, pps * ps + 3).at[0].set(0)  # an empty slot; some past the table
  return q, k_pages, v_pages, table, lengths


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference_float32_pages(native, shape):
  q, k, v, table, lengths = _operands(*shape)
  assert native.supports(q, k)
  out = jax.jit(native.decode_attention)(q, k, v, table, lengths)
  ref = paged_attention_reference(q, k, v, table, lengths)
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
  np.testing.assert_array_equal(out[0], 0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference_int8_pages(native, shape):
  q, k, v, table, lengths = _operands(*shape)
  (kq, k_scale), (vq, v_scale) = quantize_kv(k), quantize_kv(v)
  out = jax.jit(native.decode_attention)(q, kq, vq, table, lengths, k_scale, v_scale)
  ref = paged_attention_reference(q, kq, vq, table, lengths, k_scale, v_scale)
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
  with pytest.raises(ValueError, match="scales"):
    native.decode_attention(q, kq, vq, table, lengths)


def test_unsupported_shapes_are_reported(native):
  q = jnp.zeros((1, 34, 16))
  assert not native.supports(q, jnp.zeros((2, 4, 4, 16)))  # 17 query heads per kv head
  assert not native.supports(q.astype(jnp.bfloat16), jnp.zeros((34, 4, 4, 16)))


def _decode(config, params, kv_int8, n=8):
  ec = EngineConfig(max_slots=4, max_seq_len=64, page_size=8, prefill_chunk=16, steps_per_call=4,
                    kv_dtype="int8" if kv_int8 else None)
  engine = Engine(params, config, ec)
  state = engine.init_state()
  rng = np.random.RandomState(5)
  for slot, size in enumerate((9, 21, 3)):
    state, prefix = engine.prefill(state, rng.randint(3, 1000, size=size).tolist())
    state = engine.insert(prefix, state, slot, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), [],
                          seed=slot)
  tokens = []
  for _ in range(n // 4):
    for slot in range(3):
      engine.reserve(slot, 4)
    state, result = engine.generate(state)
    tokens.append(np.asarray(result.tokens)[:, :3])
  return np.concatenate(tokens), np.asarray(state.slots.logits)[:3]


@pytest.mark.parametrize("kv_int8", [False, True])
def test_engine_decode_equals_the_pure_jax_attention(native, monkeypatch, kv_int8):
  config, params = tiny_model()
  tokens, logits = _decode(config, params, kv_int8)
  monkeypatch.setenv("INTERNLM_JAX_NATIVE", "0")
  ref_tokens, ref_logits = _decode(config, params, kv_int8)
  np.testing.assert_array_equal(tokens, ref_tokens)
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # ~40 s of compiles; int8 KV alone stays in the fast suite above
def test_engine_int8_weights_and_kv_together(native, monkeypatch):
  config, params = tiny_model()
  q8 = quantize_params(params, "int8")
  monkeypatch.setenv("INTERNLM_JAX_NATIVE_VNNI_MIN_ROWS", str(10**9))  # exact matmuls: only attention differs
  # Two near-tied logits of the random model can swap a late greedy token (~1e-6 of float summation order):
  # one call of 4 steps.
  tokens, logits = _decode(config, q8, True, n=4)
  monkeypatch.setenv("INTERNLM_JAX_NATIVE", "0")
  ref_tokens, ref_logits = _decode(config, q8, True, n=4)
  np.testing.assert_array_equal(tokens, ref_tokens)
  # A ~1e-6 difference in a key can flip its int8 rounding in the cache (a step of max|k| / 127): up to ~0.4%
  # of the logits' spread here.
  np.testing.assert_allclose(logits, ref_logits, atol=1e-2 * float(ref_logits.std()))
