"""Checkpoints: bit-exact round trip, keep-K and save_every, async saves, damaged checkpoints skipped for the
previous good one, restore onto another mesh, no NaN checkpoint written, preemption signals recorded."""
import dataclasses
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from internlm_jax import PRESETS, make_mesh
from internlm_jax.checkpoint import (CheckpointError, CheckpointManager, NonFiniteStateError, PreemptionGuard,
                                     abstract_train_state, install_preemption_handler)
from internlm_jax.train import OptimizerConfig, TrainState, create_train_state, make_optimizer
from internlm_jax.train.state import state_shardings

CONFIG = PRESETS["tiny"]
TX = make_optimizer(OptimizerConfig(warmup_steps=2, total_steps=10))
# A restore that fails part-way (the damaged-checkpoint tests) leaves orbax coroutines to the garbage collector.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DATA = {"next_index": 17, "parent": {"epoch": 1, "seeds": [3, 4]}, "name": "shakespeare"}


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(fsdp=8)


@pytest.fixture(scope="module")
def state(mesh):
  """A state on fsdp=8 whose every leaf is non-trivial (fresh Adam moments are all zeros)."""
  fresh = create_train_state(CONFIG, TX, seed=0, mesh=mesh)

  def perturb(s):
    leaves, treedef = jax.tree.flatten(s)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x + 3 + i
              for i, (x, k) in enumerate(zip(leaves, keys))]
    return jax.tree.unflatten(treedef, leaves)

  return jax.jit(perturb, out_shardings=state_shardings(fresh))(fresh)


@pytest.fixture(scope="module")
def abstract(mesh):
  return abstract_train_state(CONFIG, TX, mesh)


def _assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _save_steps(directory, state, steps, **kw):
  """Saves `state` at each step with extra={"step": step}, so a restore tells which checkpoint it read."""
  with CheckpointManager(directory, save_every=1, keep=10, async_save=False, **kw) as m:
    for s in steps:
      assert m.save(s, state, DATA, extra={"step": s})


def test_round_trip_is_bit_exact(tmp_path, state, abstract):
  with CheckpointManager(tmp_path, save_every=1) as m:
    assert m.save(3, state, DATA, extra={"config": {"seq_len": 64}, "metrics_line": 12})
    m.wait()
  with CheckpointManager(tmp_path, save_every=1) as m:  # a fresh manager, as a rerun makes
    assert m.latest_step() == 3
    restored, data, extra = m.restore(abstract)
  assert isinstance(restored, TrainState)
  _assert_bit_equal(restored, state)
  assert data == DATA and extra == {"config": {"seq_len": 64}, "metrics_line": 12}
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_empty_directory_restores_nothing(tmp_path, abstract):
  with CheckpointManager(tmp_path / "new", save_every=5) as m:
    assert m.latest_step() is None
    assert m.restore(abstract) is None
  assert os.path.isdir(tmp_path / "new")


def test_save_every_and_keep(tmp_path, state):
  with CheckpointManager(tmp_path, save_every=2, keep=2, async_save=False) as m:
    saved = [s for s in range(1, 9) if m.save(s, state, DATA)]
    assert saved == [2, 4, 6, 8]
    assert m.all_steps() == [6, 8]
    assert not m.should_save(8) and not m.should_save(9) and m.should_save(10)
    assert m.save(9, state, force=True)            # e.g. the final or the preemption step
    assert not m.save(9, state, force=True)        # an existing step is left alone, not an error
    assert m.all_steps() == [8, 9]
  assert sorted(os.listdir(tmp_path)) == ["8", "9"]


def test_async_save_survives_donation(tmp_path, state, abstract):
  copy = jax.tree.map(jnp.copy, state)
  with CheckpointManager(tmp_path, save_every=1, async_save=True) as m:
    assert m.save(1, copy, DATA)
    for leaf in jax.tree.leaves(copy):  # what donating the state to the next train step does
      leaf.delete()
    m.wait()
    assert os.path.exists(tmp_path / "1" / "commit_success.txt")
    restored, data, _ = m.restore(abstract)
  _assert_bit_equal(restored, state)
  assert data == DATA


def test_half_written_tmp_dir_is_ignored(tmp_path, state, abstract):
  _save_steps(tmp_path, state, [2, 4])
  # A save killed mid-write: orbax's temporary folder, never renamed to "6".
  shutil.copytree(tmp_path / "4", tmp_path / "6.orbax-checkpoint-tmp-1700000000")
  for root, _, files in os.walk(tmp_path / "6.orbax-checkpoint-tmp-1700000000"):
    for name in files:
      if name == "commit_success.txt":
        os.remove(os.path.join(root, name))
  with CheckpointManager(tmp_path, save_every=2) as m:
    assert m.latest_step() == 4
    _, _, extra = m.restore(abstract)
    assert extra == {"step": 4}
    assert m.save(6, state, DATA)  # the resumed run writes step 6 for real
    m.wait()
    assert m.all_steps() == [2, 4, 6]
  assert not any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))


def test_damaged_checkpoints_fall_back_to_previous_good_one(tmp_path, state, abstract):
  _save_steps(tmp_path, state, [2, 4, 6])
  with CheckpointManager(tmp_path, save_every=1, keep=10) as m:
    # Step 8 is committed but holds NaN (written past our check with raw orbax): treated as damaged too.
    nan_state = dataclasses.replace(state, params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    m._manager.save(8, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nan_state), data=ocp.args.JsonSave(None), extra=ocp.args.JsonSave(None)))
  for root, _, files in os.walk(tmp_path / "6" / "state"):  # truncated files, as a dying disk leaves them
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)
  shutil.rmtree(tmp_path / "4" / "data")                 # an item missing altogether

  with CheckpointManager(tmp_path, save_every=2, keep=10) as m:
    assert m.latest_step() == 8
    with pytest.raises(CheckpointError, match="step 6 cannot be restored"):
      m.restore(abstract, step=6)                         # an explicit step is never substituted
    restored, data, extra = m.restore(abstract)
    assert extra == {"step": 2} and data == DATA
    _assert_bit_equal(restored, state)
    # Damaged steps are set aside (not deleted) so the resumed run can save them again.
    assert m.all_steps() == [2]
    assert {"4.corrupt", "6.corrupt", "8.corrupt"} <= set(os.listdir(tmp_path))
    assert m.save(4, state, DATA)
    m.wait()
    assert m.all_steps() == [2, 4]


def test_nothing_restorable_raises_and_renames_nothing(tmp_path, state, abstract):
  _save_steps(tmp_path, state, [2])
  wrong = abstract_train_state(CONFIG.replace(num_layers=3), TX)  # another model config: not disk damage
  with CheckpointManager(tmp_path, save_every=1) as m:
    with pytest.raises(CheckpointError, match="none of the checkpoints"):
      m.restore(wrong)
    assert m.all_steps() == [2]
  assert os.listdir(tmp_path) == ["2"]


@pytest.mark.parametrize("target", ["data4_tensor2", "single_device"])
def test_restore_onto_another_mesh(tmp_path, state, target):
  _save_steps(tmp_path, state, [5])
  mesh = make_mesh(data=4, fsdp=1, tensor=2) if target == "data4_tensor2" else None
  want = abstract_train_state(CONFIG, TX, mesh)
  with CheckpointManager(tmp_path, save_every=1) as m:
    restored, _, _ = m.restore(want)
  _assert_bit_equal(restored, state)
  for got, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
    assert got.sharding.is_equivalent_to(spec.sharding, got.ndim)
  if mesh is not None:  # the layout really changed: wqkv is now split over tensor, not fsdp
    wqkv = [x for p, x in jax.tree_util.tree_flatten_with_path(restored.params)[0] if "wqkv" in jax.tree_util.keystr(p)]
    assert wqkv and "tensor" in str(wqkv[0].sharding.spec)


def test_non_finite_state_is_not_saved(tmp_path, state):
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[0].set(jnp.nan)
  nan_params = dataclasses.replace(state, params=jax.tree.unflatten(treedef, leaves))
  mu_inf = dataclasses.replace(state, opt_state=jax.tree.map(
      lambda x: x * jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else x, state.opt_state))
  with CheckpointManager(tmp_path, save_every=1) as m:
    with pytest.raises(NonFiniteStateError, match=r"step 1: NaN/inf in \.params\['embed'\]; nothing written"):
      m.save(1, nan_params, force=True)
    with pytest.raises(NonFiniteStateError, match="opt_state"):
      m.save(2, mu_inf, force=True)
    m.wait()
    assert m.all_steps() == []
  assert os.listdir(tmp_path) == []


def test_extra_must_be_json(tmp_path, state):
  with CheckpointManager(tmp_path, save_every=1) as m:
    with pytest.raises(CheckpointError, match="extra must be JSON-serializable"):
      m.save(1, state, extra={"array": np.zeros(2)})


def _wait_for(predicate, timeout=2.0):
  end = time.monotonic() + timeout
  while not predicate() and time.monotonic() < end:
    time.sleep(0.01)


def test_preemption_guard_records_sigterm_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with PreemptionGuard() as stop:
    assert not stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    _wait_for(lambda: stop.received)
    assert stop(1) and stop()
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_second_sigint_interrupts_at_once():
  stop = install_preemption_handler()
  try:
    os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: save and stop at the step boundary
    _wait_for(lambda: stop.received)
    assert stop(3)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # second one: the user means it
      _wait_for(lambda: False, timeout=1.0)
  finally:
    stop.uninstall()
