"""LoRA and QLoRA: exact zero-init, merge == apply, adapters-only gradients and optimizer state, sharding, PEFT
names (and, when peft is installed, PEFT itself loading our adapters and us loading PEFT's), NF4/int8 bounds."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm_jax import PRESETS, forward, init_params, make_mesh
from internlm_jax import lora as L
from internlm_jax import lora_io as LIO
from internlm_jax import quant_nf4 as Q
from internlm_jax.hf_io import to_hf_state_dict
from internlm_jax.train import OptimizerConfig, make_optimizer
from internlm_jax.train.finetune_step import create_adapter_state, make_eval_loss, make_finetune_step

CONFIG = PRESETS["tiny"]
LCFG = L.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base():
  return init_params(CONFIG, jax.random.key(0))


def _noisy(lora, seed=1, scale=0.05):
  """Adapters with nonzero b (a fresh adapter has b = 0)."""
  leaves, treedef = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _tokens(seed=0, B=2, T=12):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (B, T)), jnp.int32)


_fwd = jax.jit(lambda p, t: forward(p, t, CONFIG))


def test_zero_init_is_exact_and_shapes(base):
  lora = L.init_lora(CONFIG, LCFG, jax.random.key(1))
  assert lora["layers"]["wqkv"]["a"].shape == (2, 64, 4)
  assert lora["layers"]["wqkv"]["b"].shape == (2, 4, 2, 4, 16)
  assert lora["layers"]["wo"]["a"].shape == (2, 4, 16, 4) and lora["output"]["b"].shape == (4, 1024)
  assert all(float(jnp.abs(n["b"]).max()) == 0 for n in [lora["output"], *lora["layers"].values()])
  assert float(jnp.abs(lora["layers"]["w1"]["a"]).max()) > 0
  tokens = _tokens()
  np.testing.assert_array_equal(_fwd(base, tokens), _fwd(L.apply_lora(base, lora, LCFG), tokens))


def test_merge_equals_apply_and_unmerge_restores(base):
  lora = _noisy(L.init_lora(CONFIG, LCFG, jax.random.key(1)))
  tokens = _tokens(1)
  merged = L.merge(base, lora, LCFG)
  applied = _fwd(L.apply_lora(base, lora, LCFG), tokens)
  np.testing.assert_allclose(_fwd(merged, tokens), applied, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(applied - _fwd(base, tokens)).max()) > 1e-2  # the adapter does change the output
  restored = L.unmerge(merged, lora, LCFG)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(base)):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # The unscanned forward merges per layer too and gives the same logits.
  unscanned = CONFIG.replace(scan_layers=False)
  unscanned_fwd = jax.jit(lambda p, t: forward(p, t, unscanned))
  np.testing.assert_allclose(unscanned_fwd(L.apply_lora(base, lora, LCFG), tokens), applied, atol=1e-5)


def test_gradients_reach_only_adapters(base):
  lora = L.init_lora(CONFIG, LCFG, jax.random.key(1))
  tokens = _tokens(2)

  def loss(base, lora):
    return jnp.mean(forward(L.apply_lora(base, lora, LCFG), tokens, CONFIG) ** 2)

  g_base, g_lora = jax.jit(jax.grad(loss, argnums=(0, 1)))(base, lora)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_base))
  assert float(jnp.abs(g_lora["layers"]["w2"]["b"]).max()) > 0  # b gets gradient at b = 0, a does not yet
  assert float(jnp.abs(g_lora["layers"]["w2"]["a"]).max()) == 0


def test_dropout_masks_only_the_adapter_input_and_is_seeded(base):
  lcfg = L.LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=("wqkv", "w2"))
  lora = _noisy(L.init_lora(CONFIG, lcfg, jax.random.key(1)))
  tokens = _tokens(3)
  plain = _fwd(L.apply_lora(base, lora, lcfg), tokens)  # no key: no dropout (evaluation)
  key = jax.random.key(7)
  dropped = _fwd(L.apply_lora(base, lora, lcfg, key), tokens)
  np.testing.assert_array_equal(dropped, _fwd(L.apply_lora(base, lora, lcfg, key), tokens))  # seeded
  assert float(jnp.abs(dropped - plain).max()) > 1e-4
  assert float(jnp.abs(dropped - _fwd(L.apply_lora(base, lora, lcfg, jax.random.key(8)), tokens)).max()) > 1e-4
  # Zero adapters: dropout on their input changes nothing, so it never touches the base path.
  zero = jax.tree.map(jnp.zeros_like, lora)
  np.testing.assert_array_equal(_fwd(L.apply_lora(base, zero, lcfg, key), tokens), _fwd(base, tokens))
  # One layer's projection by hand: x W + s * (mask * x / (1 - p)) a b with that layer's own key.
  layer_weight = jax.tree.map(lambda w: w[1], L.apply_lora(base, lora, lcfg, key)["layers"]["w2"])
  h = jax.random.normal(jax.random.key(5), (2, 5, CONFIG.intermediate_size))
  keep = jax.random.bernoulli(layer_weight.dropout_key, 0.5, h.shape)
  want = h @ base["layers"]["w2"][1] + lcfg.scale * ((jnp.where(keep, h / 0.5, 0) @ lora["layers"]["w2"]["a"][1])
                                                     @ lora["layers"]["w2"]["b"][1])
  np.testing.assert_allclose(layer_weight.project("btf,fe->bte", h, jnp.float32), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~30 s of compiles; the dropout mask itself is tested above in the fast suite
def test_sft_step_applies_dropout_reproducibly(base):
  lcfg = L.LoraConfig(rank=4, alpha=8.0, dropout=0.3)
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=20))
  lora = _noisy(L.init_lora(CONFIG, lcfg, jax.random.key(1)))
  batch = _sft_batch(2)
  losses = {}
  for name, cfg in {"dropout": lcfg, "dropout again": lcfg, "none": L.LoraConfig(rank=4, alpha=8.0)}.items():
    step = make_finetune_step(CONFIG, cfg, tx, rules=None)
    _, metrics = step(create_adapter_state(lora, tx), base, batch)
    losses[name] = float(metrics["loss"])
  assert losses["dropout"] == losses["dropout again"] and losses["dropout"] != losses["none"]


def _sft_batch(seed, B=4, T=16):
  rng = np.random.default_rng(seed)
  pattern = np.tile(rng.integers(3, 40, 8), 3)  # a repeating pattern: learnable in a few steps
  tokens = np.stack([np.roll(pattern, i)[:T + 1] for i in range(B)]).astype(np.int32)
  loss_mask = np.ones((B, T), np.int32)
  loss_mask[:, :4] = 0  # a "prompt" that is not trained
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "loss_mask": loss_mask}


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_training_reduces_loss_base_untouched_opt_state_adapters_only(base, quant):
  frozen = base if quant is None else Q.quantize_params(base, quant)
  before = [np.array(x) for x in jax.tree.leaves(frozen)]
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=20, weight_decay=0.0))
  lora = L.init_lora(CONFIG, LCFG, jax.random.key(1))
  state = create_adapter_state(lora, tx)
  adapter_shapes = {x.shape for x in jax.tree.leaves(lora)}
  opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert opt_arrays and {x.shape for x in opt_arrays} <= adapter_shapes
  assert sum(x.size for x in opt_arrays) == 2 * L.trainable_count(lora)  # Adam's two moments, nothing else
  step = make_finetune_step(CONFIG, LCFG, tx, rules=None)
  batch = _sft_batch(0)
  losses = []
  for _ in range(8):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.5, losses
  assert float(metrics["tokens"]) == 4 * 12
  for got, want in zip(jax.tree.leaves(frozen), before):
    np.testing.assert_array_equal(got, want)
  eval_loss = make_eval_loss(CONFIG, LCFG, rules=None)
  assert float(eval_loss(frozen, state.params, batch)) < float(eval_loss(frozen, None, batch))


def test_loraplus_scales_only_the_b_updates():
  lcfg = L.LoraConfig(rank=4, alpha=8.0, targets=("wqkv", "w2", "output"))
  adapters = L.init_lora(CONFIG, lcfg, jax.random.key(0))
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), adapters)
  tx = optax.adamw(1e-3, weight_decay=0.1)
  plain, _ = tx.update(grads, tx.init(adapters), adapters)
  plus_tx = L.loraplus(tx, 16.0)
  plus, _ = plus_tx.update(grads, plus_tx.init(adapters), adapters)
  for path, got in jax.tree_util.tree_leaves_with_path(plus):
    want = _at(plain, path)
    ratio = 16.0 if path[-1].key == "b" else 1.0
    np.testing.assert_allclose(got, ratio * want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert L.loraplus(tx, 1.0) is tx
  with pytest.raises(L.LoraError, match="positive"):
    L.loraplus(tx, 0.0)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_grad_accum_matches_one_batch(base):
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=20))
  lora = _noisy(L.init_lora(CONFIG, LCFG, jax.random.key(1)))
  batch = _sft_batch(1)
  batch["loss_mask"][1, :9] = 0  # uneven loss tokens across micro-batches
  out = []
  for accum in (1, 2):
    state, metrics = make_finetune_step(CONFIG, LCFG, tx, grad_accum=accum, rules=None)(
        create_adapter_state(lora, tx), base, batch)
    out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


def test_adapters_shard_like_their_base():
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  lora = L.init_lora(CONFIG, LCFG, jax.random.key(1), mesh=mesh)
  specs = {"wqkv": (None, "fsdp", None), "w1": (None, "fsdp", None), "w2": (None, "tensor", None)}
  for name, want in specs.items():
    assert tuple(lora["layers"][name]["a"].sharding.spec) == want, name
  assert tuple(lora["layers"]["wqkv"]["b"].sharding.spec) == (None, None, "tensor", None, None)
  assert tuple(lora["layers"]["w1"]["b"].sharding.spec) == (None, None, "tensor")
  assert tuple(lora["layers"]["w2"]["b"].sharding.spec) == (None, None, "fsdp")
  assert tuple(lora["output"]["b"].sharding.spec) == (None, "tensor")
  tx = make_optimizer(OptimizerConfig())
  state = create_adapter_state(lora, tx)
  mu = state.opt_state[1][0].mu
  assert mu["layers"]["w1"]["b"].sharding.spec == lora["layers"]["w1"]["b"].sharding.spec


def test_peft_names_round_trip(base, tmp_path):
  lora = _noisy(L.init_lora(CONFIG, LCFG, jax.random.key(1)))
  LIO.save_adapter(tmp_path, CONFIG, LCFG, lora, base_model_name_or_path="internlm/internlm2-chat-7b")
  cfg = json.loads((tmp_path / LIO.ADAPTER_CONFIG).read_text())
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
  assert cfg["target_modules"] == ["wqkv", "wo", "w1", "w2", "w3", "output"]
  from safetensors.numpy import load_file
  tensors = load_file(tmp_path / LIO.ADAPTER_WEIGHTS)
  assert tensors["base_model.model.model.layers.1.attention.wqkv.lora_A.weight"].shape == (4, 64)
  assert tensors["base_model.model.model.layers.1.attention.wqkv.lora_B.weight"].shape == (2 * 4 * 16, 4)
  assert tensors["base_model.model.model.layers.0.attention.wo.lora_A.weight"].shape == (4, 4 * 16)
  assert tensors["base_model.model.model.layers.0.feed_forward.w2.lora_B.weight"].shape == (64, 4)
  assert tensors["base_model.model.output.lora_B.weight"].shape == (1024, 4)
  assert len(tensors) == 2 * (5 * CONFIG.num_layers + 1)
  # The torch-layout update B @ A * scale is the HF tensor of our merged weight minus the base.
  hf_base, hf_merged = to_hf_state_dict(CONFIG, base), to_hf_state_dict(CONFIG, L.merge(base, lora, LCFG))
  for stem in ("model.layers.1.attention.wqkv", "model.layers.0.attention.wo", "output"):
    delta = tensors[f"base_model.model.{stem}.lora_B.weight"] @ tensors[f"base_model.model.{stem}.lora_A.weight"]
    np.testing.assert_allclose(LCFG.scale * delta, hf_merged[stem + ".weight"] - hf_base[stem + ".weight"],
                               atol=1e-6)
  lcfg2, lora2 = LIO.load_adapter(tmp_path, CONFIG)
  assert lcfg2 == LCFG
  for got, want in zip(jax.tree.leaves(lora2), jax.tree.leaves(lora)):
    np.testing.assert_array_equal(got, want)
  # PEFT's dotted-suffix target names load as the bare names (they were refused).
  cfg["target_modules"] = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                           "feed_forward.w3", "output"]
  (tmp_path / LIO.ADAPTER_CONFIG).write_text(json.dumps(cfg))
  assert LIO.load_adapter(tmp_path, CONFIG)[0] == LCFG
  del tensors["base_model.model.output.lora_A.weight"]
  with pytest.raises(L.LoraError, match="output.lora_A"):
    LIO.from_peft_state_dict(CONFIG, LCFG, tensors)


def _torch_skeleton(config):
  """Linear modules named like HF InternLM2 (no forward needed: PEFT only swaps and merges the Linears)."""
  from torch import nn
  c = config
  E, F, H, K, D = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim

  def layer():
    attention = nn.Module()
    attention.wqkv, attention.wo = nn.Linear(E, (H + 2 * K) * D, bias=False), nn.Linear(H * D, E, bias=False)
    ff = nn.Module()
    ff.w1, ff.w3, ff.w2 = nn.Linear(E, F, bias=False), nn.Linear(E, F, bias=False), nn.Linear(F, E, bias=False)
    out = nn.Module()
    out.attention, out.feed_forward = attention, ff
    return out

  class CausalLM(nn.Module):  # PeftModelForCausalLM looks this method up on the model it wraps
    def prepare_inputs_for_generation(self, *args, **kwargs):
      raise NotImplementedError

  root, inner = CausalLM(), nn.Module()
  inner.layers = nn.ModuleList([layer() for _ in range(c.num_layers)])
  root.model, root.output = inner, nn.Linear(E, c.vocab_size, bias=False)
  return root


def _linear_weights(module, hf):
  import torch
  state = {k: torch.from_numpy(v) for k, v in hf.items() if k in module.state_dict()}
  module.load_state_dict(state, strict=True)
  return module


def test_peft_loads_our_adapter_and_we_load_peft(base, tmp_path):
  peft = pytest.importorskip("peft")
  import torch
  lora = _noisy(L.init_lora(CONFIG, LCFG, jax.random.key(1)))
  hf_base = to_hf_state_dict(CONFIG, base)
  linear_keys = set(_torch_skeleton(CONFIG).state_dict())
  LIO.save_adapter(tmp_path / "ours", CONFIG, LCFG, lora)
  model = peft.PeftModel.from_pretrained(_linear_weights(_torch_skeleton(CONFIG), hf_base), tmp_path / "ours")
  merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
  want = to_hf_state_dict(CONFIG, L.merge(base, lora, LCFG))
  assert set(merged) == linear_keys
  for k in linear_keys:
    np.testing.assert_allclose(merged[k], want[k], atol=1e-6, err_msg=k)
  # The other way: an adapter PEFT made (random A and B) merges here exactly as PEFT merges it.
  torch.manual_seed(0)
  pcfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["wqkv", "w2", "output"], init_lora_weights=False)
  theirs = peft.get_peft_model(_linear_weights(_torch_skeleton(CONFIG), hf_base), pcfg)
  theirs.save_pretrained(tmp_path / "theirs")
  lcfg, adapters = LIO.load_adapter(tmp_path / "theirs", CONFIG)
  assert (lcfg.rank, lcfg.scale, lcfg.targets) == (2, 3.0, ("wqkv", "w2", "output"))
  merged = {k: v.detach().numpy() for k, v in theirs.merge_and_unload().state_dict().items()}
  ours = to_hf_state_dict(CONFIG, L.merge(base, adapters, lcfg))
  for k in linear_keys:
    np.testing.assert_allclose(ours[k], merged[k], atol=1e-6, err_msg=k)


# ---- quantized base --------------------------------------------------------------------------------------------
def test_nf4_levels():
  levels = Q.NF4_LEVELS
  assert levels.shape == (16,) and np.all(np.diff(levels) > 0)
  assert (levels[0], levels[7], levels[15]) == (-1.0, 0.0, 1.0)
  np.testing.assert_allclose(levels[[1, 8, 14]], [-0.6961928, 0.0795803, 0.7229568], atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantization_error_within_bound(kind):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((3, 40, 2, 5)) * 0.02, jnp.float32)  # 400 elements: a partial last block
  w = w.at[0, 0, 0, 0].set(0.5)  # an outlier: only its own block / channel loses precision
  q = Q.quantize(w, kind, n_lead=1, n_in=1)
  err = jnp.abs(Q.dequantize(q) - w)
  assert bool(jnp.all(err <= Q.error_bound(w, q) * (1 + 1e-6) + 1e-12))
  rel = float(jnp.sqrt(jnp.mean(err[1:] ** 2)) / jnp.sqrt(jnp.mean(w[1:] ** 2)))
  assert rel < (0.12 if kind == "nf4" else 0.01), rel
  assert Q.dequantize(q).shape == w.shape and q.shape == w.shape
  if kind == "nf4":
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 7 * 64 // 2) and q.scales.shape == (3, 7)
    assert float(err[0].reshape(-1)[64:].max()) < 0.01  # blocks without the outlier keep fine resolution
  else:
    assert q.codes.dtype == jnp.int8 and q.scales.shape == (3, 1, 2, 5)


def test_qlora_forward_at_init(base):
  q = Q.quantize_params(base, "nf4")
  targeted = sum(x.size for k, x in base["layers"].items() if k in Q.DEFAULT_QUANT_TARGETS)
  stored = sum(q["layers"][k].nbytes for k in Q.DEFAULT_QUANT_TARGETS)
  assert stored / targeted <= 0.5 + 4 / 64 + 1e-9
  lora = L.init_lora(CONFIG, LCFG, jax.random.key(1))
  tokens = _tokens(3)
  qlora = _fwd(L.apply_lora(q, lora, LCFG), tokens)
  np.testing.assert_allclose(qlora, _fwd(Q.dequantize_params(q), tokens), atol=1e-5)
  full = _fwd(base, tokens)
  assert float(jnp.abs(qlora - full).max()) < 0.2 * float(jnp.abs(full).max())
  q8 = _fwd(Q.quantize_params(base, "int8", targets=list(L.TARGETS)), tokens)
  np.testing.assert_allclose(q8, full, atol=0.02 * float(jnp.abs(full).max()))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_embedding_rows_and_head_chunks_match_the_dequantized_weight(kind):
  w = jax.random.normal(jax.random.key(0), (64, 640)) * 0.02
  q = Q.quantize(w, kind)
  d = Q.dequantize(q)
  idx = jnp.array([[3, 5], [63, 0]])
  np.testing.assert_array_equal(Q.take_rows(q, idx), d[idx])
  np.testing.assert_array_equal(Q.column_slice(q, 128, 256), d[:, 128:384])
  x = jax.random.normal(jax.random.key(1), (2, 8, 64))
  t = jax.random.randint(jax.random.key(2), (2, 8), 0, 640)
  # 640 columns in chunks of 192: the last chunk overlaps the one before and must not count its columns twice.
  chunked = lambda x: Q.quantized_head_cross_entropy(x, q, t, max_chunk=192).sum()
  dense = lambda x: optax.softmax_cross_entropy_with_integer_labels(x @ d, t).sum()
  np.testing.assert_allclose(chunked(x), dense(x), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(chunked)(x), jax.grad(dense)(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_layer_by_layer_quantization_embedding_and_head_and_born_quantized_base(base, kind):
  every = ["embed", *L.TARGETS]
  q = jax.jit(lambda p: Q.quantize_params(p, kind, targets=every))(base)
  np.testing.assert_array_equal(q["layers"]["w1"].codes, Q.quantize(base["layers"]["w1"], kind, n_lead=1).codes)
  np.testing.assert_array_equal(Q.dequantize(q["embed"]), Q.dequantize(Q.quantize(base["embed"], kind)))
  T = 16
  batch = {"tokens": _tokens(2, 2, T), "segment_ids": jnp.ones((2, T), jnp.int32),
           "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (2, 1)), "loss_mask": jnp.ones((2, T), jnp.int32),
           "targets": jax.random.randint(jax.random.key(3), (2, T), 0, CONFIG.vocab_size)}
  from internlm_jax.train.finetune_step import base_cross_entropy_sums
  from internlm_jax.train.step import cross_entropy_sums
  got = base_cross_entropy_sums(q, batch, CONFIG)  # embedding rows decoded alone, head one chunk at a time
  want = cross_entropy_sums(Q.dequantize_params(q), batch, CONFIG)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  born = Q.init_quantized_params(CONFIG, jax.random.key(0), kind, targets=every)
  assert jax.tree.structure(born) == jax.tree.structure(q)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(born)] == [(x.shape, x.dtype) for x in jax.tree.leaves(q)]
  assert abs(float(jnp.std(Q.dequantize(born["layers"]["w2"]))) - CONFIG.initializer_range) < 0.2 * CONFIG.initializer_range
