"""The fused QLoRA MLP (internlm_jax/qlora_mlp.py) against the generic path it replaces (LoraWeight.project per
projection, itself tested against the dequantized weights): values, all gradients, when it applies, and that under
full remat its recomputed forward is dropped. Tiny shapes: seconds on CPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax import layers
from internlm_jax import qlora_mlp as M
from internlm_jax import quant_nf4 as Q
from internlm_jax import quant_nf4_ops as O
from internlm_jax.lora import LoraWeight

E, F, R = 64, 384, 8


def _lora(seed, shape, kind="nf4", double_quant=False, scale=2.0, **kw):
  k = jax.random.split(jax.random.key(seed), 3)
  base = Q.quantize(jax.random.normal(k[0], shape) * 0.05, kind, double_quant=double_quant)
  a = jax.random.normal(k[1], (shape[0], R)) * 0.1
  b = jax.random.normal(k[2], (R, shape[1])) * 0.1  # nonzero: a fresh adapter's b = 0 would hide errors in it
  return LoraWeight(base, a, b, scale, 1, **kw)


@functools.lru_cache(maxsize=None)
def _weights(double_quant=False):
  """(w1, w3, w2), built in one compiled call (eager quantization op by op took seconds)."""
  return jax.jit(lambda: (_lora(0, (E, F), double_quant=double_quant),
                          _lora(1, (E, F), double_quant=double_quant, scale=0.5),
                          _lora(2, (F, E), double_quant=double_quant)))()


def _generic(x, w1, w3, w2, dtype):
  gate, up = layers.project("bte,ef->btf", x, w1, dtype), layers.project("bte,ef->btf", x, w3, dtype)
  return layers.project("btf,fe->bte", layers.swiglu_hidden(gate, up, x.dtype), w2, dtype)


def _fused(x, w1, w3, w2, dtype):
  return M.fused_qlora_mlp(x, w1, w3, w2, jnp.dtype(dtype))


@pytest.mark.parametrize("double_quant,group_elems", [(False, 1 << 20), (True, 64 * 128)])  # 1 or 3 groups
def test_fused_equals_generic_values_and_gradients(double_quant, group_elems, monkeypatch):
  monkeypatch.setattr(O, "DECODE_GROUP_ELEMS", group_elems)
  w1, w3, w2 = _weights(double_quant)
  assert M.fusable(w1, w3, w2)
  assert M._sizes(w1, w3, w2)[2] == (1 if group_elems > E * F else 3)
  x = jax.random.normal(jax.random.key(5), (2, 5, E))
  ct = jax.random.normal(jax.random.key(6), (2, 5, E))

  def loss(fn):
    return lambda x, w1, w3, w2: jnp.sum(fn(x, w1, w3, w2, jnp.float32) * ct)
  np.testing.assert_allclose(jax.jit(_fused, static_argnums=4)(x, w1, w3, w2, jnp.float32),
                             jax.jit(_generic, static_argnums=4)(x, w1, w3, w2, jnp.float32), rtol=1e-5, atol=1e-6)
  ours = jax.jit(jax.grad(loss(_fused), argnums=(0, 1, 2, 3), allow_int=True))(x, w1, w3, w2)
  ref = jax.jit(jax.grad(loss(_generic), argnums=(0, 1, 2, 3), allow_int=True))(x, w1, w3, w2)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
  for got, want in zip(ours[1:], ref[1:]):
    np.testing.assert_allclose(got.a, want.a, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(got.b, want.b, rtol=1e-5, atol=2e-5)
    for leaf in jax.tree.leaves(got.base):   # the frozen base gets zero cotangents (float0 for integer leaves)
      assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))


def test_fused_in_bfloat16_compute_is_close_to_float32():
  w1, w3, w2 = _weights()
  x = jax.random.normal(jax.random.key(5), (2, 5, E))
  want = jax.jit(_generic, static_argnums=4)(x, w1, w3, w2, jnp.float32)

  def bf16(w1):
    out = _fused(x.astype(jnp.bfloat16), w1, w3, w2, jnp.bfloat16)
    return jnp.sum(out.astype(jnp.float32)), out
  (_, got), grads = jax.jit(jax.value_and_grad(bf16, has_aux=True, allow_int=True))(w1)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.02 * float(jnp.max(jnp.abs(want))))
  assert grads.a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(grads.a)))


def test_layers_mlp_takes_the_fused_path_only_when_it_applies(monkeypatch):
  w1, w3, w2 = _weights()
  calls = []
  real = M.fused_qlora_mlp
  monkeypatch.setattr(M, "fused_qlora_mlp", lambda *a: calls.append(1) or real(*a))
  x = jax.random.normal(jax.random.key(5), (1, 3, E))
  jax.eval_shape(lambda x: layers.mlp(x, w1, w3, w2, jnp.float32), x)
  assert calls == [1]
  # not fused: LoRA dropout active, an int8 base, a weight without an adapter, F with no whole-block split
  shapes = lambda make: jax.eval_shape(make)   # noqa: E731  (only shapes matter here)
  dropped = shapes(lambda: _lora(0, (E, F), dropout_key=jax.random.key(0), dropout=0.1))
  int8 = shapes(lambda: _lora(0, (E, F), kind="int8"))
  odd = shapes(lambda: (_lora(0, (E, 96)), _lora(1, (E, 96)), _lora(2, (96, E))))  # 96 units: no 64-block split
  for ws in [(dropped, w3, w2), (int8, w3, w2), (w1, w3, w2.base), odd]:
    assert not M.fusable(*ws)
    jax.eval_shape(lambda x, ws: layers.mlp(x, *ws, jnp.float32), x, ws)
  assert calls == [1]


def test_full_remat_drops_the_recomputed_forward(monkeypatch):
  """Under jax.checkpoint(nothing_saveable) the backward needs only x, so the compiled value-and-gradient runs two
  loops over the groups (the forward, the backward), not a third recomputing the forward."""
  monkeypatch.setattr(O, "DECODE_GROUP_ELEMS", 64 * 128)   # three groups (XLA unrolls a loop of one)
  w1, w3, w2 = _weights()
  x = jax.random.normal(jax.random.key(5), (2, 5, E))
  ct = jax.random.normal(jax.random.key(6), (2, 5, E))
  block = jax.checkpoint(lambda x, w1: _fused(x, w1, w3, w2, jnp.float32),
                         policy=jax.checkpoint_policies.nothing_saveable)
  step = jax.jit(jax.value_and_grad(lambda x, w1: jnp.sum(block(x, w1) * ct), argnums=(0, 1), allow_int=True))
  assert step.lower(x, w1).compile().as_text().count(" while(") == 2


def test_split_qkv_gradient_is_that_of_the_slices():
  G = 3
  qkv = jax.random.normal(jax.random.key(7), (2, 4, 2, G + 2, 8))
  cts = [jax.random.normal(jax.random.key(8 + i), s.shape) for i, s in enumerate(layers.split_qkv(qkv, G))]
  pairs = lambda parts: sum(jnp.sum(p * c) for p, c in zip(parts, cts))   # noqa: E731
  ours = jax.grad(lambda x: pairs(layers.split_qkv(x, G)))(qkv)
  ref = jax.grad(lambda x: pairs((x[:, :, :, :G], x[:, :, :, G], x[:, :, :, G + 1])))(qkv)
  np.testing.assert_array_equal(ours, ref)
