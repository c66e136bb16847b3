"""The model agrees across attention impls (xla / chunked / blockwise / pallas / cudnn), and blockwise prefill memory is O(T)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import internlm_jax as ij
from internlm_jax import attention
from internlm_jax.attention_blockwise import blockwise_attention

IMPLS = ("xla", "chunked", "blockwise", "pallas", "cudnn")
FAST = {"xla_backend_optimization_level": 0}  # interpret-mode kernels compile about twice as fast


def fast_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)


def rel_err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


@pytest.fixture(scope="module")
def tiny():
  # Small blocks so the 24-token batch spans several blockwise tiles.
  config = ij.PRESETS["tiny"].replace(attention_block_size=8)
  return config, fast_jit(lambda key: ij.init_params(config, key), jax.random.key(0))


def test_logits_agree_across_impls_with_packed_segments(tiny):
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, config.vocab_size)
  segment_ids = jnp.asarray([[0] * 10 + [1] * 9 + [2] * 5, [4] * 24], jnp.int32)
  positions = jnp.asarray([list(range(10)) + list(range(9)) + list(range(5)), list(range(24))], jnp.int32)

  def logits(impl):
    c = config.replace(attention_impl=impl)
    return fast_jit(lambda p, t, s, pos: ij.forward(p, t, c, segment_ids=s, positions=pos), params, tokens,
                    segment_ids, positions)

  want = logits("xla")
  for impl in IMPLS[1:]:
    assert rel_err(logits(impl), want) < 1e-5, impl


def test_cached_prefill_and_decode_agree_across_impls(tiny):
  # forward_with_cache passes q_index = cache length + arange(T) over the whole buffer: prefill 11, decode 1.
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, config.vocab_size)

  def run(impl):
    c = config.replace(attention_impl=impl)

    def steps(params, tokens):
      cache = ij.init_cache(c, 2, 32)
      first, cache = ij.forward_with_cache(params, tokens[:, :11], c, cache)
      last, _ = ij.forward_with_cache(params, tokens[:, 11:], c, cache)
      return jnp.concatenate([first, last], axis=1)
    return fast_jit(steps, params, tokens)

  want = run("xla")
  np.testing.assert_allclose(want, fast_jit(lambda p, t: ij.forward(p, t, config), params, tokens), atol=1e-5)
  for impl in IMPLS[1:]:
    assert rel_err(run(impl), want) < 1e-5, impl


def test_parameter_gradients_agree_across_impls(tiny):
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(3), (2, 20), 0, config.vocab_size)
  segment_ids = jnp.asarray([[0] * 7 + [1] * 13, [2] * 20], jnp.int32)

  def grads(impl):
    c = config.replace(attention_impl=impl)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(ij.forward(p, tokens, c, segment_ids=segment_ids))[..., 0])
    return fast_jit(jax.grad(loss), params)

  want = grads("xla")
  for impl in IMPLS[1:]:
    got = grads(impl)
    errs = jax.tree.map(rel_err, got, want)
    assert max(jax.tree.leaves(errs)) < 1e-5, (impl, errs)


def test_dispatch_registers_impls_by_name():
  q = jnp.ones((1, 3, 1, 2, 16))
  kv = jnp.ones((1, 3, 1, 16))
  q_index = jnp.arange(3, dtype=jnp.int32)[None]
  q_segments = jnp.asarray([[0, 1, 2]], jnp.int32)  # ignored: segments apply only when both sides are given
  for impl in IMPLS:
    out = jax.jit(lambda q, kv, i, s: attention.attend(q, kv, kv, i, s, None, impl=impl))(q, kv, q_index, q_segments)
    np.testing.assert_allclose(out, jnp.ones_like(q), atol=1e-6)
  with pytest.raises(ValueError, match="not available"):
    attention.attend(q, kv, kv, q_index, impl="nope")


# ---- long context ----------------------------------------------------------------------------------------------
def long_config(**kw):
  """A tiny model whose 2048-token window is stretched by dynamic NTK (factor 2) for longer prefills."""
  fields = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=128, max_position_embeddings=2048, rope_scaling_factor=2.0,
                attention_impl="blockwise", attention_block_size=512)
  return ij.ModelConfig(**{**fields, **kw})


def prefill_temp_bytes(config, length):
  params = jax.eval_shape(lambda: ij.init_params(config, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  compiled = jax.jit(lambda p, t: ij.forward(p, t, config)).lower(params, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_prefill_memory_grows_linearly():
  config = long_config()
  temp = {t: prefill_temp_bytes(config, t) for t in (8192, 16384, 32768)}
  # Linear growth doubles the increment with each doubling of T; a [T, T] term would quadruple it.
  growth = (temp[32768] - temp[16384]) / (temp[16384] - temp[8192])
  assert growth < 2.5, temp
  one_score_matrix = 32768 ** 2 * 4  # a single float32 [T, T] array at 32K: 4 GiB
  assert temp[32768] < one_score_matrix / 16, temp


def test_dynamic_ntk_prefill_past_the_window_matches_xla():
  # A shorter window keeps this cheap: 320 tokens > 256 grows the rotary base exactly as 32K > 2048 would.
  config = long_config(num_layers=1, max_position_embeddings=256, attention_block_size=64)
  params = fast_jit(lambda key: ij.init_params(config, key), jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 320), 0, config.vocab_size)
  want = fast_jit(lambda p, t: ij.forward(p, t, config.replace(attention_impl="xla")), params, tokens)
  got = fast_jit(lambda p, t: ij.forward(p, t, config), params, tokens)
  assert rel_err(got, want) < 1e-5


@pytest.mark.slow
def test_blockwise_prefills_32k_tokens():
  config = long_config()
  params = ij.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 32768), 0, config.vocab_size)
  logits = jax.jit(lambda p, t: ij.forward(p, t, config))(params, tokens)
  assert logits.shape == (1, 32768, config.vocab_size)
  assert np.all(np.isfinite(np.asarray(logits[0, ::997])))
  # The last 8 queries, recomputed on their own over the same keys, match (a check of the long tiling).
  q = jax.random.normal(jax.random.key(2), (1, 32768, 2, 2, 16))
  kv = jax.random.normal(jax.random.key(3), (1, 32768, 2, 16))
  q_index = jnp.arange(32768, dtype=jnp.int32)[None]
  full = jax.jit(lambda q, kv: blockwise_attention(q, kv, kv, q_index))(q, kv)[:, -8:]
  tail = attention.xla_attention(q[:, -8:], kv, kv, q_index[:, -8:])
  assert rel_err(full, tail) < 1e-5
