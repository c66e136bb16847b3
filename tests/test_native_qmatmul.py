"""Native int8-weight matmul (XLA FFI, built on first use): kernels against the pure-JAX product, the engine's
int8 decode through it, and the fallback when it is disabled or cannot be built."""
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.native import build, qmatmul
from internlm_jax.quant import quantize, quantize_params
from internlm_jax.serve import paged_model
from internlm_jax.serve.testing import greedy_run, tiny_model

EXACT = 10**9  # min_rows no call reaches: the exact kernel for every row


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
  monkeypatch.delenv("INTERNLM_JAX_NATIVE", raising=False)
  monkeypatch.delenv("INTERNLM_JAX_NATIVE_VNNI_MIN_ROWS", raising=False)


@pytest.fixture
def native(native_ready):
  assert qmatmul.available(), qmatmul._state.get("error")
  return qmatmul


def test_native_path_is_active_where_it_can_be():
  """A machine with a compiler and the CPU features must not silently run the fallback."""
  if not (build.can_build_here() and jax.default_backend() == "cpu"):
    pytest.skip("needs a C++ compiler and an AVX512-VNNI CPU")
  assert qmatmul.available(), qmatmul._state.get("error")


def _weight(N, K, seed=0):
  w = jax.random.normal(jax.random.key(seed), (N, K)) * 0.05
  qa = quantize(w, 1)
  return qmatmul.pack(qa.q.reshape(N, K), qa.scale.reshape(N))


@pytest.mark.parametrize("M,N,K", [(1, 8, 64), (1, 37, 100), (3, 33, 130), (32, 64, 256), (70, 13, 200),
                                   (5, 260, 768), (2, 5, 7)])
def test_kernels_match_the_pure_jax_product(native, M, N, K):
  w = _weight(N, K, seed=M + N)
  plain = jax.random.normal(jax.random.key(K), (M, K))
  # Without outliers the VNNI error is ~1% of the output's spread (int8 rounding of x: a relative 1/(127 sqrt 3)).
  err = jax.jit(lambda x, w: native.qmatmul(x, w, min_rows=0))(plain, w) - qmatmul.reference(plain, w)
  assert float(jnp.sqrt(jnp.mean(err ** 2))) < 0.02 * float(qmatmul.reference(plain, w).std())
  x = plain.at[:, K // 3].multiply(30.0)  # an outlier channel costs precision in its own block of 64 only
  ref = np.asarray(qmatmul.reference(x, w))
  scale = np.abs(ref).max()
  exact = np.asarray(jax.jit(lambda x, w: native.qmatmul(x, w, min_rows=EXACT))(x, w))
  np.testing.assert_allclose(exact, ref, atol=2e-6 * scale, rtol=0)
  vnni = np.asarray(jax.jit(lambda x, w: native.qmatmul(x, w, min_rows=0))(x, w))
  bound = np.asarray(qmatmul.vnni_error_bound(x, w))
  assert np.all(np.abs(vnni - ref) <= bound + 2e-6 * scale), np.max(np.abs(vnni - ref) - bound)
  default = np.asarray(jax.jit(native.qmatmul)(x, w))
  np.testing.assert_array_equal(default, exact if M < qmatmul.vnni_min_rows() else vnni)


@pytest.mark.parametrize("M,N,K,group", [(1, 20, 256, 64), (5, 48, 192, 64), (7, 33, 512, 256), (2, 16, 96, 8)])
def test_group_scales_match_the_pure_jax_product(native, M, N, K, group):
  """One scale per row and group of inputs (wo's per-head groups) applied inside the kernel."""
  w = jax.random.normal(jax.random.key(N), (N, K)) * jnp.repeat(jnp.logspace(-2, 0, K // group), group)
  qa = quantize(w.reshape(N, K // group, group), 2)
  iw = qmatmul.pack(qa.q.reshape(N, K), qa.scale.reshape(N, K // group))
  np.testing.assert_array_equal(iw.q, qa.q.reshape(N, K))
  np.testing.assert_allclose(iw.astype(jnp.float32), (qa.q * qa.scale).reshape(N, K), rtol=1e-6)
  x = jax.random.normal(jax.random.key(M), (M, K)).at[:, 3].multiply(20.0)
  ref = np.asarray(qmatmul.reference(x, iw))
  scale = np.abs(ref).max()
  exact = np.asarray(jax.jit(lambda x, w: native.qmatmul(x, w, min_rows=EXACT))(x, iw))
  np.testing.assert_allclose(exact, ref, atol=2e-6 * scale, rtol=0)
  vnni = np.asarray(jax.jit(lambda x, w: native.qmatmul(x, w, min_rows=0))(x, iw))
  bound = np.asarray(qmatmul.vnni_error_bound(x, iw))
  assert np.all(np.abs(vnni - ref) <= bound + 2e-6 * scale), np.max(np.abs(vnni - ref) - bound)


def test_pack_round_trip_concat_and_bad_groups():
  w = _weight(37, 100)
  both = qmatmul.concat([w, _weight(5, 100, seed=3)])
  assert both.shape == (42, 100)
  np.testing.assert_array_equal(both.q[:37], w.q)
  np.testing.assert_allclose(both.astype(jnp.float32)[:37], w.astype(jnp.float32))
  with pytest.raises(ValueError, match="multiple of 4"):
    qmatmul.pack(jnp.zeros((4, 96), jnp.int8), jnp.ones((4, 32)))  # groups of 3


def test_leading_axes_and_shape_errors(native):
  w = _weight(12, 40)
  x = jax.random.normal(jax.random.key(1), (2, 3, 40))
  y = jax.jit(lambda x, w: native.qmatmul(x, w, min_rows=EXACT))(x, w)
  assert y.shape == (2, 3, 12)
  np.testing.assert_allclose(y, qmatmul.reference(x, w), atol=1e-5)
  with pytest.raises(ValueError, match="qmatmul"):
    native.qmatmul(jnp.ones((2, 41)), w)


def _greedy(config, params, prompt, n):
  engine, prefix, tokens, _ = greedy_run(params, config, prompt, n, max_slots=2)
  return engine, np.asarray(prefix.logits), tokens


def test_engine_int8_decode_equals_the_pure_jax_path(native, monkeypatch):
  config, params = tiny_model()
  q8 = quantize_params(params, "int8")
  prompt = np.random.RandomState(3).randint(3, 1000, size=21).tolist()
  monkeypatch.setenv("INTERNLM_JAX_NATIVE", "0")
  engine, ref_logits, ref_tokens = _greedy(config, q8, prompt, 12)
  assert isinstance(engine.params["layers"][0]["w1"], tuple)  # the row blocks of the pure-JAX path
  monkeypatch.setenv("INTERNLM_JAX_NATIVE", "1")
  monkeypatch.setenv("INTERNLM_JAX_NATIVE_VNNI_MIN_ROWS", str(EXACT))  # exact kernel for prefill too
  engine, logits, tokens = _greedy(config, q8, prompt, 12)
  assert isinstance(engine.params["layers"][0]["w13"], qmatmul.Int8Weight)  # w1 and w3 stacked
  assert isinstance(engine.params["output"], qmatmul.Int8Weight)
  assert isinstance(engine.params["layers"][0]["wo"], qmatmul.Int8Weight)  # per-head scales
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  assert tokens == ref_tokens
  # Default dispatch: the prompt's rows take the VNNI kernel; logits stay within int8-activation error.
  monkeypatch.delenv("INTERNLM_JAX_NATIVE_VNNI_MIN_ROWS")
  # Measured here: mean 0.5%, max 2.3% of the logits' spread (hidden 64: one block of x per row).
  _, logits, _ = _greedy(config, q8, prompt, 4)
  assert np.abs(logits - ref_logits).mean() < 0.01 * ref_logits.std()
  assert np.abs(logits - ref_logits).max() < 0.05 * ref_logits.std()


def test_disabled_by_env_keeps_the_pure_jax_path(monkeypatch):
  config, params = tiny_model()
  q8 = quantize_params(params, "int8")
  monkeypatch.setenv("INTERNLM_JAX_NATIVE", "0")
  assert not qmatmul.available()
  assert not paged_model.native_int8(q8, config)
  serving = paged_model.serving_params(q8, config)
  assert isinstance(serving["output"], tuple)


def test_build_failure_falls_back_with_one_warning(monkeypatch):
  monkeypatch.setattr(qmatmul, "_state", {})
  monkeypatch.setattr(build, "load", lambda name: (_ for _ in ()).throw(RuntimeError("no compiler here")))
  with pytest.warns(UserWarning, match="no compiler here"):
    assert not qmatmul.available()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not qmatmul.available()  # reported once
  config, params = tiny_model()
  assert not paged_model.native_int8(quantize_params(params, "int8"), config)


def test_concurrent_builds_leave_one_library(tmp_path, monkeypatch):
  """Two processes building into an empty cache (pytest-xdist): both load, one .so remains, no temp files."""
  import subprocess
  import sys
  if not build.compiler():
    pytest.skip("needs a C++ compiler")
  monkeypatch.setenv("INTERNLM_JAX_NATIVE_CACHE", str(tmp_path))
  code = "from internlm_jax.native import build; build.load('qmatmul')"
  root = pathlib.Path(__file__).parents[1]
  procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root) for _ in range(2)]
  assert [p.wait(timeout=300) for p in procs] == [0, 0]
  assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("qmatmul-*.so")]
  assert len(list(tmp_path.iterdir())) == 1
