"""Model behaviour: full-size shapes without allocation, cached decode, packing, scan/remat switches, NTK."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax import PRESETS, ConfigError, ModelConfig, forward, forward_with_cache, init_cache, init_params
from internlm_jax import layers, model
from internlm_jax.config import from_hf_config, get_preset, to_hf_config

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_params():
  return init_params(TINY, jax.random.key(0))


def _tokens(key, batch, length, vocab=TINY.vocab_size):
  return jax.random.randint(jax.random.key(key), (batch, length), 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("name,expected", [("internlm2-1.8b", 1.89e9), ("internlm2-7b", 7.74e9),
                                           ("internlm2-20b", 19.86e9), ("internlm2.5-7b", 7.74e9)])
def test_full_size_param_counts_without_allocating(name, expected):
  config = PRESETS[name]
  shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert abs(count - expected) / expected < 0.005, (name, count)
  assert count == config.num_params()


def test_flops_per_token_is_six_n_plus_attention():
  config = PRESETS["internlm2-7b"]
  n = config.num_params(include_embedding=False) + config.vocab_size * config.hidden_size
  flops = config.flops_per_token(4096)
  assert flops > 6 * n
  assert flops == pytest.approx(6 * n + 6 * config.num_layers * config.num_heads * 128 * 4096)


def test_forward_shape_and_dtype(tiny_params):
  logits = forward(tiny_params, _tokens(1, 2, 16), TINY)
  assert logits.shape == (2, 16, TINY.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_compute_is_close_to_float32(tiny_params):
  tokens = _tokens(2, 2, 16)
  ref = forward(tiny_params, tokens, TINY)
  low = forward(tiny_params, tokens, TINY.replace(dtype="bfloat16"))
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, ref, atol=5e-2)


def test_decode_with_cache_matches_full_forward(tiny_params):
  tokens = _tokens(3, 2, 12)
  full = forward(tiny_params, tokens, TINY)
  cache = init_cache(TINY, batch=2, max_len=16)
  step = jax.jit(lambda p, t, c: forward_with_cache(p, t, TINY, c))
  logits, cache = step(tiny_params, tokens[:, :5], cache)  # prefill 5
  outs = [logits]
  for t in range(5, 12):  # then one token at a time
    logits, cache = step(tiny_params, tokens[:, t:t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
  assert cache.lengths.tolist() == [12, 12]


def test_decode_rows_at_different_lengths(tiny_params):
  a, b = _tokens(4, 1, 9), _tokens(5, 1, 6)
  cache = init_cache(TINY, batch=2, max_len=12)
  padded_b = jnp.pad(b, ((0, 0), (0, 3)))
  # Prefill rows separately by length: row 0 with 9 tokens, row 1 with 6 (the rest of its prefill is ignored).
  _, cache = forward_with_cache(tiny_params, jnp.concatenate([a, padded_b]), TINY, cache)
  cache = model.KVCache(cache.k, cache.v, jnp.array([9, 6], jnp.int32))
  nxt = _tokens(6, 2, 1)
  logits, _ = forward_with_cache(tiny_params, nxt, TINY, cache)
  ref_a = forward(tiny_params, jnp.concatenate([a, nxt[:1]], axis=1), TINY)[:, -1]
  ref_b = forward(tiny_params, jnp.concatenate([b, nxt[1:]], axis=1), TINY)[:, -1]
  np.testing.assert_allclose(logits[:, 0], jnp.concatenate([ref_a, ref_b]), rtol=1e-5, atol=1e-5)


def test_packed_segments_equal_separate_forwards(tiny_params):
  lengths = [5, 7, 4]
  docs = [_tokens(10 + i, 1, n) for i, n in enumerate(lengths)]
  packed = jnp.concatenate(docs, axis=1)
  segment_ids = jnp.concatenate([jnp.full((1, n), i + 1, jnp.int32) for i, n in enumerate(lengths)], axis=1)
  positions = jnp.concatenate([jnp.arange(n, dtype=jnp.int32)[None] for n in lengths], axis=1)
  logits = forward(tiny_params, packed, TINY, segment_ids=segment_ids, positions=positions)
  start = 0
  for doc, n in zip(docs, lengths):
    np.testing.assert_allclose(logits[:, start:start + n], forward(tiny_params, doc, TINY), rtol=1e-5, atol=1e-5)
    start += n


@pytest.mark.parametrize("changes", [dict(scan_layers=False), dict(remat_policy="full"),
                                     dict(remat_policy="full_split"), dict(remat_policy="save_dots"),
                                     dict(remat_policy="save_attention")])
def test_scan_and_remat_switches_keep_values_and_grads(tiny_params, changes):
  tokens = _tokens(7, 2, 8)
  def loss(p, config):
    return jnp.mean(forward(p, tokens, config) ** 2)
  ref_loss, ref_grads = jax.value_and_grad(loss)(tiny_params, TINY)
  new_loss, new_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(tiny_params, TINY.replace(**changes))
  np.testing.assert_allclose(new_loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), new_grads, ref_grads)


def test_unknown_remat_policy_is_named(tiny_params):
  with pytest.raises(ValueError, match="remat_policy 'bogus'"):
    forward(tiny_params, _tokens(1, 1, 4), TINY.replace(remat_policy="bogus"))


def _ntk_base_reference(base, factor, seq_len, max_pos, dim):
  # Written from the HF InternLM2 DynamicNTKScalingRotaryEmbedding formula, in plain Python.
  if seq_len <= max_pos:
    return base
  return base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))


@pytest.mark.parametrize("seq_len", [100, 512, 513, 2048, 40000])
def test_dynamic_ntk_base_matches_formula(seq_len):
  config = TINY.replace(rope_scaling_factor=2.5, max_position_embeddings=512, rope_theta=5e7)
  got = float(layers.rope_base(config, seq_len))
  assert got == pytest.approx(_ntk_base_reference(5e7, 2.5, seq_len, 512, config.head_dim), rel=1e-6)


def test_dynamic_ntk_changes_logits_only_past_max_positions(tiny_params):
  short = TINY.replace(max_position_embeddings=8, rope_scaling_factor=2.0)
  tokens = _tokens(8, 1, 12)
  np.testing.assert_allclose(forward(tiny_params, tokens[:, :8], short), forward(tiny_params, tokens[:, :8], TINY),
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(forward(tiny_params, tokens, short), forward(tiny_params, tokens, TINY), atol=1e-4)


def test_rope_angles_reference():
  config = TINY
  pos = jnp.arange(6, dtype=jnp.int32)[None]
  cos, sin = layers.rope_angles(config, pos, 6)
  inv = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim))
  np.testing.assert_allclose(cos[0], np.cos(np.arange(6)[:, None] * inv[None]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sin[0], np.sin(np.arange(6)[:, None] * inv[None]), rtol=1e-5, atol=1e-6)
  # Computed once through an identity dot (so XLA does not fuse them into every layer): exactly cos and sin.
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (2, 50)), jnp.int32)
  got = jax.jit(lambda p: layers.rope_angles(config, p, 4096))(pos)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(layers, "_materialized", lambda x: x)
    want = jax.jit(lambda p: layers.rope_angles(config, p, 4096))(pos)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_hf_config_round_trip_and_errors(tmp_path):
  for name in ("internlm2-1.8b", "internlm2.5-7b", "tiny"):
    config = PRESETS[name]
    assert from_hf_config(to_hf_config(config)) == config
  with pytest.raises(ConfigError, match="not an InternLM2 config"):
    from_hf_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
  bad = to_hf_config(TINY)
  del bad["hidden_size"]
  with pytest.raises(ConfigError, match="hidden_size"):
    from_hf_config(bad)
  with pytest.raises(ConfigError, match="no config.json"):
    from_hf_config(tmp_path)
  with pytest.raises(ConfigError, match="unknown preset 'internlm9'"):
    get_preset("internlm9")
  with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
    ModelConfig(num_heads=6, num_kv_heads=4)


def test_hf_config_fields_that_change_the_model_are_read_or_refused(tmp_path):
  # transformers 5 saves rope_scaling and rope_theta as rope_parameters (PretrainedConfig.save_pretrained).
  hf = to_hf_config(PRESETS["internlm2.5-7b"])
  del hf["rope_scaling"], hf["rope_theta"]
  hf["rope_parameters"] = {"rope_type": "dynamic", "type": "dynamic", "factor": 2.5, "rope_theta": 5e7}
  assert from_hf_config(hf) == PRESETS["internlm2.5-7b"]
  hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e7}
  assert from_hf_config(hf).rope_scaling_type is None and from_hf_config(hf).rope_theta == 5e7
  with pytest.raises(ConfigError, match="hidden_act='gelu' is not supported"):
    from_hf_config(dict(to_hf_config(TINY), hidden_act="gelu"))
  with open(tmp_path / "config.json", "w") as f:  # errors of the derived ModelConfig name the file too
    json.dump(dict(to_hf_config(TINY), rope_scaling={"type": "yarn", "factor": 2.0}), f)
  with pytest.raises(ConfigError, match=r"config\.json: rope_scaling_type .* got 'yarn'"):
    from_hf_config(tmp_path)
