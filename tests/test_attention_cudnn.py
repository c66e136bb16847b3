"""The cudnn attention impl against the float32 reference: bf16 forward and gradients with packed segments and GQA.

On CPU (the default suite) the call runs jax's XLA version of jax.nn.dot_product_attention, which checks our
wrapper (head grouping, segment mask, causality); on a GPU (JAX_PLATFORMS=cuda, experiments/device_check.sh) the
same test runs cuDNN's fused kernel.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.attention_cudnn import cudnn_attention, cudnn_supported
from kernels.flash_attention_reference import attention_reference


def packed_segments(rng, batch, length):
  cuts = [np.sort(rng.choice(np.arange(1, length), size=3, replace=False)) for _ in range(batch)]
  return jnp.asarray(np.stack([np.searchsorted(c, np.arange(length), side="right") for c in cuts]), jnp.int32)


@pytest.mark.parametrize("dtype,segments", [(jnp.bfloat16, True), (jnp.bfloat16, False), (jnp.float32, True)])
def test_forward_and_gradients_match_reference(dtype, segments):
  B, T, K, G, D = 2, 256, 2, 4, 64
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, K, G, D), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (B, T, K, D), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (B, T, K, D), jnp.float32).astype(dtype)
  cot = jax.random.normal(keys[3], q.shape, jnp.float32)
  seg = packed_segments(np.random.default_rng(0), B, T) if segments else None
  q_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

  def value_and_grads(fn, *args):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_index, seg, seg), *args)
    return out, vjp(cot.astype(out.dtype))

  got, got_grads = jax.jit(lambda *a: value_and_grads(cudnn_attention, *a))(q, k, v)
  up = lambda x: x.astype(jnp.float32)
  want, want_grads = jax.jit(lambda *a: value_and_grads(attention_reference, *a))(up(q), up(k), up(v))
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  assert got.dtype == dtype
  for name, g, w in zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    err = np.max(np.abs(g - w)) / max(1.0, np.max(np.abs(w)))
    assert np.all(np.isfinite(g)) and err < tol, f"{name}: {err:.2e} on {jax.default_backend()}"


def test_supported_mirrors_jax_cudnn_checks():
  hopper = dict(backend="gpu", compute_capability=9.0)
  assert cudnn_supported(jnp.bfloat16, 128, **hopper) and cudnn_supported(jnp.float16, 256, **hopper)
  assert not cudnn_supported(jnp.float32, 128, **hopper)
  assert not cudnn_supported(jnp.bfloat16, 100, **hopper)
  assert not cudnn_supported(jnp.bfloat16, 256, backend="gpu", compute_capability=8.0)
  assert not cudnn_supported(jnp.bfloat16, 128, seq_len=511, with_bias=True, **hopper)
  assert cudnn_supported(jnp.bfloat16, 128, seq_len=511, with_bias=False, **hopper)
  assert not cudnn_supported(jnp.bfloat16, 128, backend="cpu")


def test_fallback_off_gpu_warns_once():
  import internlm_jax.attention_cudnn as ac
  q = jnp.ones((1, 8, 1, 2, 16))
  kv = jnp.ones((1, 8, 1, 16))
  index = jnp.arange(8, dtype=jnp.int32)[None]
  ac._warned.clear()
  with pytest.warns(UserWarning, match="using jax's XLA attention"):
    cudnn_attention(q, kv, kv, index)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cudnn_attention(q, kv, kv, index)  # the same shape again: silent
