"""The train step: accumulation equals one big batch, meshes match one device, non-finite steps are skipped."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm_jax import PRESETS, make_mesh
from internlm_jax.sharding import DEFAULT_RULES
from internlm_jax.train import OptimizerConfig, create_train_state, make_optimizer, make_train_step
from internlm_jax.train.optimizer import decay_mask, learning_rate_schedule
from internlm_jax.train.state import state_shardings
from internlm_jax.train.step import _accumulated_grads

CONFIG = PRESETS["tiny"].replace(num_heads=8, num_kv_heads=4)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10)


def _batch(seed, B=8, T=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (B, T + 1)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[:, T // 2:] = 2  # two documents per row
  segment_ids[0, -3:] = 0      # padding
  positions = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
  loss_mask = (segment_ids > 0).astype(np.int32)
  loss_mask[3, :5] = 0         # uneven token counts across micro-batches
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
          "positions": positions, "loss_mask": loss_mask}


def _run(steps, grad_accum=1, mesh=None, batch_fn=_batch):
  tx = make_optimizer(OPT)
  state = create_train_state(CONFIG, tx, seed=0, mesh=mesh)
  kwargs = {}
  if mesh is not None:
    kwargs = dict(state_sharding=state_shardings(state),
                  batch_sharding=DEFAULT_RULES.sharding(mesh, ("batch", "seq")))
  step = make_train_step(CONFIG, tx, grad_accum=grad_accum, **kwargs)
  losses = []
  ctx = jax.set_mesh(mesh) if mesh is not None else _null()
  with ctx:
    for i in range(steps):
      previous = state.params["layers"]["w1"]
      state, metrics = step(state, batch_fn(i))
      assert previous.is_deleted()  # the state is donated: updated in place, not copied beside the old one
      losses.append(float(metrics["loss"]))
  return state, losses


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


@pytest.fixture(scope="module")
def single_device_run():
  return _run(3)


def test_loss_decreases_and_norms_are_not_decayed(single_device_run):
  state, losses = _run(6, batch_fn=lambda i: _batch(0))
  assert losses[-1] < losses[0]
  mask = decay_mask(state.params)
  assert mask["layers"]["wqkv"] and not mask["layers"]["attention_norm"] and not mask["norm"]


@pytest.mark.parametrize("grad_accum", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_grad_accumulation_equals_one_big_batch(single_device_run, grad_accum):
  ref_state, ref_losses = single_device_run
  state, losses = _run(3, grad_accum=grad_accum)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  # Adam turns float32 summation-order noise in near-zero gradients into lr-sized steps: compare the gradients
  # themselves tightly, and the parameters after three steps at a tolerance well under one lr step (1e-2).
  params = ref_state.params
  batch = {k: jnp.asarray(v) for k, v in _batch(7).items()}
  big = _accumulated_grads(params, batch, CONFIG, None, 1)
  acc = _accumulated_grads(params, batch, CONFIG, None, grad_accum)
  np.testing.assert_allclose(acc[0], big[0], rtol=1e-6)
  assert float(acc[1]) == float(big[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), acc[2], big[2])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), state.params, ref_state.params)


@pytest.mark.parametrize("mesh_kw", [dict(data=8, fsdp=1), dict(fsdp=8), dict(data=2, fsdp=1, tensor=4),
                                     dict(data=2, fsdp=2, tensor=2)], ids=["dp", "fsdp", "tensor", "2x2x2"])
def test_meshes_match_one_device(single_device_run, mesh_kw):
  ref_state, ref_losses = single_device_run
  state, losses = _run(3, mesh=make_mesh(**mesh_kw))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Parameters after three Adam steps of lr 1e-2: agreement to 2% of one step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), state.params, ref_state.params)
  assert state.opt_state[1][0].mu["layers"]["w1"].sharding.spec == state.params["layers"]["w1"].sharding.spec


def test_non_finite_loss_skips_the_update():
  tx = make_optimizer(OPT)
  state = create_train_state(CONFIG, tx, seed=0)
  before = jax.tree.map(np.asarray, state.params)
  step = make_train_step(CONFIG, tx)
  bad = jax.tree.map(lambda p: p, state.params)
  state.params["norm"] = state.params["norm"].at[0].set(jnp.nan)
  state, metrics = step(state, _batch(0))
  assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.step) == 1
  assert np.isnan(np.asarray(state.params["norm"][0]))  # untouched: the poisoned value stays, nothing else moves
  np.testing.assert_array_equal(state.params["layers"]["w1"], before["layers"]["w1"])
  del bad



def test_bfloat16_compute_keeps_float32_master_weights():
  """Traced, not compiled: the step's matmuls run in bfloat16 while params and Adam moments stay float32."""
  tx = make_optimizer(OPT)

  def traced(config):
    abstract = jax.eval_shape(lambda: create_train_state(config, tx, seed=0))
    step = make_train_step(config, tx)
    return jax.eval_shape(step, abstract, _batch(0))[0], jax.make_jaxpr(step)(abstract, _batch(0))

  (new_state, low), (_, high) = traced(CONFIG.replace(dtype="bfloat16")), traced(CONFIG)
  for leaf in jax.tree.leaves((new_state.params, new_state.opt_state[1][0].mu, new_state.opt_state[1][0].nu)):
    assert leaf.dtype == jnp.float32
  bf16_dots = lambda jaxpr: len(re.findall(r"bf16\[[^\]]*\] = dot_general", str(jaxpr)))
  assert bf16_dots(low) >= 5 * CONFIG.num_layers and bf16_dots(high) == 0


def test_warmup_cosine_schedule_and_global_norm_clipping():
  cfg = OptimizerConfig(learning_rate=1e-2, min_lr_ratio=0.1, warmup_steps=4, total_steps=20, grad_clip=1.0)
  lr = jax.jit(jax.vmap(learning_rate_schedule(cfg)))(jnp.array([0, 2, 4, 12, 20]))
  # Linear warmup to the peak, cosine to min_lr_ratio * peak at total_steps (halfway down at the midpoint).
  np.testing.assert_allclose(lr, [0.0, 5e-3, 1e-2, 5.5e-3, 1e-3], rtol=1e-5)
  params = {"w": jnp.ones((4, 3)), "norm": jnp.ones((3,))}
  # A huge then a small gradient: Adam is scale-free on one step, but not across steps of unequal size.
  grads = [jax.tree.map(lambda p, v=v: jnp.full(p.shape, v), params) for v in (40.0, 0.1)]

  def updates(opt_cfg):
    tx = make_optimizer(opt_cfg)

    def run(gs):
      opt_state, out = tx.init(params), []
      for g in gs:
        u, opt_state = tx.update(g, opt_state, params)
        out.append(u)
      return out
    return jax.jit(run)

  clipped = [jax.tree.map(lambda x, n=optax.global_norm(g): x * jnp.minimum(1.0, 1.0 / n), g) for g in grads]
  no_clip = updates(dataclasses.replace(cfg, grad_clip=0.0))
  ours, manual, raw = updates(cfg)(grads), no_clip(clipped), no_clip(grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, manual)
  assert not np.allclose(ours[1]["w"], raw[1]["w"])
