"""The fused output head + cross-entropy (train/loss.py) against optax on materialised logits."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm_jax.train.loss import head_cross_entropy


def _inputs(dtype=jnp.float32, B=2, T=16, E=8, V=50):
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (B, T, E)).astype(dtype)
  w = (jax.random.normal(kw, (E, V)) * 0.5).astype(dtype)
  targets = jax.random.randint(kt, (B, T), 0, V)
  weights = jax.random.uniform(jax.random.key(3), (B, T))  # a loss mask / token weights
  return x, w, targets, weights


def _reference(x, w, targets, weights):
  logits = jnp.einsum("bte,ev->btv", x, w, preferred_element_type=jnp.float32)
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)


@pytest.mark.parametrize("chunk_size", [None, 4, 8])
def test_values_and_gradients_match_optax(chunk_size):
  x, w, targets, weights = _inputs()
  ours = lambda x, w: jnp.sum(head_cross_entropy(x, w, targets, chunk_size=chunk_size) * weights)
  ref = lambda x, w: _reference(x, w, targets, weights)
  np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-6)
  got, want = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_keep_float32_losses_and_input_dtypes_for_gradients():
  x, w, targets, weights = _inputs(jnp.bfloat16)
  losses = head_cross_entropy(x, w, targets)
  assert losses.dtype == jnp.float32
  ref = optax.softmax_cross_entropy_with_integer_labels(
      jnp.einsum("bte,ev->btv", x, w, preferred_element_type=jnp.float32), targets)
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  dx, dw = jax.grad(lambda x, w: jnp.sum(head_cross_entropy(x, w, targets, chunk_size=8)), argnums=(0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16


def test_chunk_size_must_divide_the_sequence():
  x, w, targets, _ = _inputs()
  with pytest.raises(ValueError, match="must divide"):
    head_cross_entropy(x, w, targets, chunk_size=5)
