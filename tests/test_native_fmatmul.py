"""Native float32 serving matmul (XLA FFI, built on first use, weights packed in strips of 64 outputs) against
XLA's dot, and the engine's float32 decode through it against the pure-JAX path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.native import fmatmul
from internlm_jax.serve import paged_model
from internlm_jax.serve.testing import greedy_run, tiny_model


@pytest.fixture
def native(native_ready):
  assert fmatmul.available(), fmatmul._state.get("error")
  return fmatmul


# One row (the streaming path), two, tiles of 6 with every remainder, many tiles (whole-K blocks); N off the
# strip width, K off the 128-row block.
@pytest.mark.parametrize("M,N,K", [(1, 37, 100), (1, 300, 770), (2, 64, 300), (3, 5, 7), (7, 130, 33),
                                   (40, 200, 260), (101, 70, 129)])
def test_matches_xla_and_rows_are_independent(native, M, N, K):
  x = jax.random.normal(jax.random.key(M), (M, K))
  w = native.pack(jax.random.normal(jax.random.key(N), (N, K)))
  y = np.asarray(jax.jit(native.fmatmul)(x, w))
  ref = np.asarray(jnp.einsum("mk,nk->mn", x, w.astype(jnp.float32), precision="highest"))
  np.testing.assert_allclose(y, ref, atol=2e-6 * np.abs(ref).max(), rtol=0)
  one = jax.jit(native.fmatmul)
  for m in range(M):  # a row's result does not depend on the rows beside it, nor on which path computed it
    np.testing.assert_array_equal(np.asarray(one(x[m:m + 1], w))[0], y[m])


def test_pack_round_trip_linear_dispatch_and_errors(native):
  dense = jax.random.normal(jax.random.key(0), (70, 40))
  w = fmatmul.pack(dense)
  assert w.packed.shape == (2, 40, 64) and w.shape == (70, 40)
  np.testing.assert_array_equal(w.astype(jnp.float32), dense)
  few, many = jnp.ones((1, 3, 40)), jnp.ones((2, 80, 40))
  for x in (few, many):
    assert "internlm_jax_fmatmul" in str(jax.jit(fmatmul.linear).lower(x, w).as_text())
    np.testing.assert_allclose(fmatmul.linear(x, w), x @ dense.T, rtol=1e-5)
  half = jnp.ones((1, 3, 40), jnp.bfloat16)  # other dtypes: XLA's dot on the unpacked weight
  assert "internlm_jax_fmatmul" not in str(jax.jit(fmatmul.linear).lower(half, w).as_text())
  with pytest.raises(ValueError, match="fmatmul"):
    native.fmatmul(jnp.ones((2, 41)), w)


def _greedy(config, params, n=8):
  prompt = np.random.RandomState(7).randint(3, 1000, size=13).tolist()
  engine, _, tokens, state = greedy_run(params, config, prompt, n)
  return engine, tokens, np.asarray(state.slots.logits)


def test_engine_batch1_float32_decode_equals_the_pure_jax_path(native, monkeypatch):
  config, params = tiny_model()
  engine, tokens, logits = _greedy(config, params)
  assert isinstance(engine.params["layers"][0]["w13"], fmatmul.F32Weight)  # w1 and w3 stacked
  assert isinstance(engine.params["output"], fmatmul.F32Weight)
  monkeypatch.setenv("INTERNLM_JAX_NATIVE", "0")
  assert not paged_model.native_float32(config)
  engine, ref_tokens, ref_logits = _greedy(config, params)
  assert "w13" not in engine.params["layers"][0] and not isinstance(engine.params["layers"][0]["w1"], fmatmul.F32Weight)
  assert tokens == ref_tokens
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
