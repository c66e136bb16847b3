"""8-bit AdamW moments (train/adam8bit.py): code maps and block quantization, tracking float32 AdamW, small leaves
kept float, state size, sharding and checkpoint round trips, the config option."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from internlm_jax.train import adam8bit as a8
from internlm_jax.train.optimizer import OptimizerConfig, decay_mask, learning_rate_schedule, make_optimizer
from internlm_jax.train.state import TrainState, train_state_shardings
from test_finetune_loop import _cfg, _records, setup  # noqa: F401  (the fine-tuning loop's fixture, for the slow test)


def _state(tx, params):
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jnp.zeros((2,), jnp.uint32), skipped=jnp.zeros((), jnp.int32))


def _step(tx, loss):
  def step(state, batch):
    grads = jax.grad(loss)(state.params, batch)
    updates, opt = tx.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt,
                      rng=state.rng, skipped=state.skipped)
  return step


def _assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_code_maps():
  for signed in (True, False):
    m = a8.dynamic_code_map(signed)
    assert m.shape == (256,) and m.dtype == np.float32 and np.all(np.diff(m) > 0)
    assert 0.0 in m and m[-1] == 1.0 and (m[0] < -0.99 if signed else m[0] == 0.0)
    small = np.min(np.abs(m[m != 0]))
    assert 1e-7 < small < 1e-6  # the dynamic range reaches seven decades below the block's absmax
  # The unsigned map spends the sign bit on precision: half the largest gap of the signed one.
  assert np.diff(a8.dynamic_code_map(False)).max() < 0.6 * np.diff(a8.dynamic_code_map(True)).max()


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_index_is_a_binary_search(signed):
  code_map = a8.dynamic_code_map(signed)
  midpoints = (code_map[1:] + code_map[:-1]) / 2
  rng = np.random.default_rng(4)
  y = np.concatenate([rng.uniform(-1, 1, 50_000), rng.standard_normal(50_000) * 10.0 ** rng.uniform(-9, 0, 50_000),
                      code_map, midpoints, np.nextafter(midpoints, 2), np.nextafter(midpoints, -2),
                      [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45]]).astype(np.float32)
  y = np.clip(y, -1.0 if signed else 0.0, 1.0)
  got = jax.jit(a8.nearest_code_index, static_argnums=1)(jnp.asarray(y), signed)
  np.testing.assert_array_equal(got, np.searchsorted(midpoints, y, side="left"))


@pytest.mark.parametrize("signed", [True, False])
def test_block_round_trip_error_bounds(signed):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 256)) * np.exp(rng.uniform(-8, 4, (64, 1)))  # blocks of very different scales
  x *= rng.uniform(size=x.shape) > 0.1   # some exact zeros
  x[5] = 0.0                             # an all-zero block
  if not signed:
    x = x ** 2                           # second moments
  x = jnp.asarray(x, jnp.float32)
  codes, absmax = jax.jit(a8.quantize_blocks, static_argnums=1)(x, signed)
  assert codes.dtype == (jnp.int8 if signed else jnp.uint8) and absmax.shape == (64,)
  y = np.asarray(a8.dequantize_blocks(codes, absmax))
  x, absmax = np.asarray(x), np.asarray(absmax)
  np.testing.assert_array_equal(absmax, np.abs(x).max(axis=1))
  half_gap = np.diff(a8.dynamic_code_map(signed)).max() / 2   # 0.0070 signed, 0.0035 unsigned
  assert np.all(np.abs(y - x) <= half_gap * absmax[:, None] * (1 + 1e-5))
  # Per block, the error is a small fraction of the block's norm (measured at most 1.3% signed, 0.8% unsigned).
  rel = np.linalg.norm(y - x, axis=1) / np.maximum(np.linalg.norm(x, axis=1), 1e-30)
  assert rel.max() < (0.02 if signed else 0.015), rel.max()
  assert np.all(y[x == 0] == 0) and np.all(y[5] == 0)        # zeros stay zero
  assert np.all(np.sign(y) * np.sign(x) >= 0)                 # signs kept (tiny values may round to 0)
  top = np.abs(x).argmax(axis=1)
  peak = x[np.arange(64), top]
  assert np.all(y[np.arange(64), top][peak > 0] == peak[peak > 0])  # a block's positive absmax is exact


def _least_squares():
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
  w_true = rng.standard_normal((64, 96)) / 8
  ys = jnp.asarray(xs @ w_true + 0.5 + 0.01 * rng.standard_normal((128, 96)), jnp.float32)
  params = {"w": jnp.zeros((64, 96), jnp.float32), "b": jnp.zeros((96,), jnp.float32)}  # w 6144 (8-bit), b float
  loss = lambda p, batch: jnp.mean((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2)
  return params, loss, (xs, ys)


def _run(tx, params, loss, batch, steps):
  step = _step(tx, loss)

  def body(state, _):
    return step(state, batch), loss(state.params, batch)
  return jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(_state(tx, params))


def test_tracks_float32_adamw_on_least_squares():
  params, loss, batch = _least_squares()
  kw = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
  ref_state, ref_loss = _run(optax.adamw(1e-2, **kw), params, loss, batch, 50)
  state, losses = _run(a8.adamw_8bit(1e-2, **kw), params, loss, batch, 50)
  assert state.opt_state[0].mu["w"].dtype == jnp.int8 and state.opt_state[0].mu["b"].dtype == jnp.float32
  ref_loss, losses = np.asarray(ref_loss), np.asarray(losses)
  assert losses[-1] < 0.05 * losses[0]  # it trains: loss 1.22 -> 0.019
  # Measured: loss curves within 1.6% of each other at every step; final w differs by 0.0016 on average (|w| is
  # 0.10 on average) and 0.013 at most (1.3 steps of lr 1e-2), b by 0.0025 at most.
  np.testing.assert_allclose(losses, ref_loss, rtol=0.03)
  for name in ("w", "b"):
    diff = np.abs(np.asarray(state.params[name]) - np.asarray(ref_state.params[name]))
    assert diff.max() < 0.03 and diff.mean() < 0.005, (name, diff.max(), diff.mean())


def test_small_leaves_keep_optax_float_moments_exactly():
  rng = np.random.default_rng(2)
  params = {"norm": jnp.ones((100,)), "w": jnp.zeros((80, 64)), "tiny": jnp.zeros((3, 5), jnp.bfloat16)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params) for _ in range(3)]
  ours, ref = a8.scale_by_adam_8bit(b1=0.9, b2=0.95), optax.scale_by_adam(b1=0.9, b2=0.95)

  def run(tx):  # one program each: fused into one, XLA may round the two differently in the last bit
    s = tx.init(params)
    for g in grads:
      u, s = tx.update(g, s)
    return u, s
  u, s = jax.jit(run, static_argnums=0)(ours)
  v, r = jax.jit(run, static_argnums=0)(ref)
  assert s.mu["w"].dtype == jnp.int8 and s.nu["w"].dtype == jnp.uint8 and s.mu_absmax.shape == (20,)
  for name in ("norm", "tiny"):  # below min_8bit_size: optax's moments (the param's dtype) and arithmetic
    _assert_bit_equal((s.mu[name], s.nu[name]), (r.mu[name], r.nu[name]))
    assert u[name].dtype == v[name].dtype
    # The same ops; in different programs XLA may fuse the division differently (measured: 1 ulp).
    np.testing.assert_allclose(np.asarray(u[name], np.float32), np.asarray(v[name], np.float32), rtol=1e-6)
  # The quantized leaf's update is close to float Adam's: |update| is 0.5 on average, the difference 0.006 on
  # average and 0.056 at most (measured) after three steps of unrelated gradients.
  diff = np.abs(np.asarray(u["w"]) - np.asarray(v["w"]))
  assert diff.max() < 0.1 and diff.mean() < 0.015, (diff.max(), diff.mean())


def _plain_adamw_8bit(learning_rate, b1, b2, eps, weight_decay, mask):
  """adamw_8bit written plainly, leaf after leaf with nothing ordering them: the reference arithmetic."""
  def update_fn(updates, state, params=None):
    count = optax.safe_increment(state.count)

    def adam(g, m, v):
      m = optax.tree.update_moment(g, m, b1, 1)
      v = optax.tree.update_moment_per_elem_norm(g, v, b2, 2)
      m_hat, v_hat = optax.tree.bias_correction(m, b1, count), optax.tree.bias_correction(v, b2, count)
      return m, v, m_hat / (jnp.sqrt(v_hat + 0.0) + eps)   # eps_root 0.0, as scale_by_adam_8bit
    grads, treedef = jax.tree.flatten(updates)
    out, mu, nu, mu_scales, nu_scales, start = [], [], [], [], [], 0
    for g, m, v in zip(grads, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)):
      if m.dtype != jnp.int8:
        m, v, u = adam(g, m, v)
        out, mu, nu = out + [u], mu + [m], nu + [v]
        continue
      k = a8._num_blocks(g.size, a8.BLOCK_SIZE)
      m32 = a8.dequantize_blocks(a8._to_blocks(m, a8.BLOCK_SIZE), state.mu_absmax[start:start + k])
      v32 = a8.dequantize_blocks(a8._to_blocks(v, a8.BLOCK_SIZE), state.nu_absmax[start:start + k])
      start += k
      m32, v32, u = adam(a8._to_blocks(g.astype(jnp.float32), a8.BLOCK_SIZE), m32, v32)
      (m_codes, m_absmax), (v_codes, v_absmax) = a8.quantize_blocks(m32, True), a8.quantize_blocks(v32, False)
      out.append(a8._from_blocks(u, g.shape).astype(g.dtype))
      mu.append(a8._from_blocks(m_codes, g.shape))
      nu.append(a8._from_blocks(v_codes, g.shape))
      mu_scales, nu_scales = mu_scales + [m_absmax], nu_scales + [v_absmax]
    return treedef.unflatten(out), a8.ScaleByAdam8bitState(count, treedef.unflatten(mu), treedef.unflatten(nu),
                                                           jnp.concatenate(mu_scales), jnp.concatenate(nu_scales))
  adam = optax.GradientTransformation(a8.scale_by_adam_8bit().init, update_fn)
  return optax.chain(adam, optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def test_leaf_by_leaf_update_is_bit_identical_to_the_plain_one():
  """Ordering the leaves (and applying each one's update as it is done) changes no bit: codes, scales, updates
  and params over three steps, with clipping and the decay mask. 8-bit leaves: whole blocks, a padded one, a
  stacked norm without decay; and a small float one."""
  shapes = {"a": (3, 40, 64), "odd": (37, 129), "stack_norm": (12, 512), "norm": (64,)}
  params = {k: jnp.asarray(np.random.default_rng(5).standard_normal(s), jnp.float32) for k, s in shapes.items()}
  rng = np.random.default_rng(6)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-3, 0), p.dtype),
                        params) for _ in range(3)]
  schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10))

  def run(adamw):
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay_mask))

    def step(p, opt_state, g):  # as the training steps: state as arguments, the update applied in the program
      updates, opt_state = tx.update(g, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, updates
    step, out = jax.jit(step), (params, tx.init(params), None)
    for g in grads:
      out = step(out[0], out[1], g)
    return out
  ours, ref = run(a8.adamw_8bit), run(_plain_adamw_8bit)
  assert ours[1][1][0].mu["odd"].dtype == jnp.int8 and ours[1][1][0].mu["norm"].dtype == jnp.float32
  _assert_bit_equal(ours, ref)


def test_update_holds_one_leafs_float32_temporaries_at_a_time():
  """Six 1 MiB leaves (XLA:CPU's default scheduler): the update's temporaries are the scaled gradients and about
  two leaves more (measured 8.0 MiB); unordered, XLA kept every leaf's float32 moments at once (13.0 MiB)."""
  from internlm_jax.train.finetune_step import apply_update
  params = {f"w{i}": jax.ShapeDtypeStruct((4, 128, 512), jnp.float32) for i in range(6)}
  tx = make_optimizer(OptimizerConfig(moments="int8"))
  state = jax.eval_shape(lambda p: _state(tx, p), params)
  step = jax.jit(lambda state, g: apply_update(state, tx, jnp.float32(1.0), jnp.float32(1.0), g), donate_argnums=0)
  temp = step.lower(state, params).compile().memory_analysis().temp_size_in_bytes
  assert temp < (6 + 4) * 2**20, temp / 2**20


def test_state_is_at_least_3_5x_smaller_for_a_large_leaf():
  params = {"w": jax.ShapeDtypeStruct((4, 512, 256), jnp.float32)}
  f32 = a8.state_bytes(jax.eval_shape(optax.scale_by_adam().init, params))
  int8 = a8.state_bytes(jax.eval_shape(a8.scale_by_adam_8bit().init, params))
  assert f32 / int8 >= 3.5, (f32, int8)   # 8 bytes vs 2 + 8/256 per element: 3.94x


def test_masked_leaves_get_no_state():
  params = {"a": jnp.ones((64, 64)), "b": jnp.ones((64, 64))}
  tx = optax.masked(a8.scale_by_adam_8bit(), {"a": True, "b": False})
  state = tx.init(params)
  assert state.inner_state.mu["a"].dtype == jnp.int8 and isinstance(state.inner_state.mu["b"], optax.MaskedNode)
  g = {"a": jnp.full((64, 64), 2.0), "b": jnp.full((64, 64), 3.0)}
  u, _ = jax.jit(tx.update)(g, state)
  np.testing.assert_allclose(u["a"], 1.0, rtol=1e-4)   # Adam's first step is sign(g) (float32 bias correction)
  np.testing.assert_array_equal(u["b"], 3.0)           # masked out: passed through


def test_sharded_state_follows_params_and_matches_unsharded():
  """train_state_shardings (what the loops use) gives codes their parameter's sharding and replicates the
  scales; two jitted sharded updates (leaves sharded on their middle and last dims) equal the single-device
  ones."""
  from internlm_jax.sharding import make_mesh
  mesh = make_mesh(fsdp=8)
  specs = {"a": P(None, "fsdp", None), "b": P(None, None, "fsdp"), "norm": P("fsdp")}
  shapes = {"a": (2, 64, 40), "b": (2, 40, 64), "norm": (64,)}
  rng = np.random.default_rng(3)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.standard_normal((2,) + s), jnp.float32) for k, s in shapes.items()}  # two steps
  psh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tx = a8.adamw_8bit(1e-2, weight_decay=0.1, mask={"a": True, "b": True, "norm": False}, min_8bit_size=1024)
  sh = train_state_shardings(jax.eval_shape(lambda p: _state(tx, p), params), tx, mesh, psh)
  inner = sh.opt_state[0]
  assert inner.mu["a"].spec == specs["a"] and inner.nu["b"].spec == specs["b"] and inner.mu_absmax.spec == P()

  def two(params, grads):
    def body(carry, g):
      params, opt = carry
      updates, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, updates), opt), None
    return jax.lax.scan(body, (params, tx.init(params)), grads)[0]
  gsh = {k: NamedSharding(mesh, P(None, *s)) for k, s in specs.items()}
  with jax.set_mesh(mesh):  # as the fine-tuning loop runs: the 8-bit leaves' blocks are computed replicated
    sharded = jax.jit(two, in_shardings=(psh, gsh), out_shardings=(sh.params, sh.opt_state))(
        jax.device_put(params, psh), jax.device_put(grads, gsh))
  single = jax.jit(two)(params, grads)
  assert sharded[1][0].mu["a"].sharding.spec == specs["a"] and sharded[1][0].mu_absmax.sharding.spec == P()
  for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6, atol=1e-7)


def test_checkpoint_round_trip_continues_bit_identically(tmp_path):
  from internlm_jax.checkpoint import CheckpointManager
  params, loss, batch = _least_squares()
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20, moments="int8"))
  step = jax.jit(_step(tx, loss))
  state = _state(tx, params)
  for _ in range(3):
    state = step(state, batch)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with CheckpointManager(tmp_path, save_every=1, async_save=False) as m:
    assert m.save(3, state, {"i": 3})
  with CheckpointManager(tmp_path, save_every=1, async_save=False) as m:
    restored, data, _ = m.restore(abstract)
  assert data == {"i": 3}
  _assert_bit_equal(restored, state)
  a, b = state, restored
  for _ in range(3):
    a, b = step(a, batch), step(b, batch)
  _assert_bit_equal(a, b)


def test_config_option_and_its_validation():
  with pytest.raises(ValueError, match=re.escape("optimizer moments must be one of ('float32', 'int8'), "
                                                 "got 'fp8'")):
    OptimizerConfig(moments="fp8")
  # The default is still optax.adamw under the same schedule, clipping and decay mask, bit for bit.
  cfg = OptimizerConfig(warmup_steps=1, total_steps=10)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      learning_rate_schedule(cfg), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay_mask))
  params = {"w": jnp.ones((64, 128)), "norm": jnp.ones((64,))}
  grads = jax.tree.map(lambda p: jnp.linspace(-1, 2, p.size).reshape(p.shape), params)

  def two_steps(tx):
    state = tx.init(params)
    u, state = tx.update(grads, state, params)
    return tx.update(grads, state, params)
  _assert_bit_equal(jax.jit(two_steps, static_argnums=0)(make_optimizer(cfg)),
                    jax.jit(two_steps, static_argnums=0)(ref))
  int8 = jax.eval_shape(make_optimizer(OptimizerConfig(moments="int8")).init, params)
  assert int8[1][0].mu["w"].dtype == jnp.int8 and int8[1][0].mu["norm"].dtype == jnp.float32


def test_finetune_config_key_is_checked_before_loading(tmp_path):
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import sft_lora_tiny
  from internlm_jax.config import ConfigError
  from internlm_jax.finetune import validate
  c = sft_lora_tiny.get_config()
  assert c.optimizer.moments == "float32"
  c.optimizer.moments = "int4"
  with pytest.raises(ConfigError, match=re.escape("config.optimizer: optimizer moments must be one of")):
    validate(c)  # base.checkpoint is empty: the optimizer is checked first


@pytest.mark.slow
def test_lora_finetune_step_with_int8_moments():
  from internlm_jax.config import get_preset
  from internlm_jax.lora import LoraConfig, init_lora
  from internlm_jax.model import init_params
  from internlm_jax.train import finetune_step
  config = get_preset("tiny")
  base = init_params(config, jax.random.key(0))
  lcfg = LoraConfig(rank=32, alpha=16.0, targets=("w1", "w2"))
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, moments="int8"))
  state = finetune_step.create_adapter_state(init_lora(config, lcfg, jax.random.key(1)), tx)
  assert any(x.dtype == jnp.int8 for x in jax.tree.leaves(state.opt_state))
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, (2, 17)).astype(np.int32)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((2, 16), np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)), "loss_mask": np.ones((2, 16), np.int32)}
  step = finetune_step.make_finetune_step(config, lcfg, tx)
  losses = []
  for _ in range(4):
    state, metrics = step(state, base, batch)
    losses.append(float(metrics["loss"]))
  assert bool(metrics["finite"]) and losses[-1] < losses[0]


@pytest.mark.slow
def test_finetune_loop_with_int8_moments_resumes_identically(setup, tmp_path):
  """The loop's path on the 8-device mesh: sharded state, orbax checkpoint, resume (as test_finetune_loop's
  rerun test, with rank 64 so that the adapters are 8-bit leaves)."""
  import json
  import shutil
  from internlm_jax.finetune import run
  over = {"optimizer.moments": "int8", "lora.rank": 64}
  full = tmp_path / "full"
  run(_cfg(setup, "lora", steps=4, over=over), str(full))
  part = tmp_path / "part"
  shutil.copytree(full / "checkpoints", part / "checkpoints", ignore=shutil.ignore_patterns("4"))
  with open(part / "metrics.jsonl", "w") as f:
    f.writelines(line for line in open(full / "metrics.jsonl") if json.loads(line)["step"] <= 2)
  assert run(_cfg(setup, "lora", steps=4, over=dict(over, stop_after=3)), str(part)) == {"stopped": True, "step": 3}
  assert _records(part) == {step: r for step, r in _records(full).items() if step <= 3}
