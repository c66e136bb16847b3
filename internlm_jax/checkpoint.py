"""Training checkpoints: the TrainState, the data iterator's state and small JSON extras, every N steps, keep K.

    ckpt = CheckpointManager(workdir / "checkpoints", save_every=100, keep=3)
    restored = ckpt.restore(abstract_train_state(config, tx, mesh))   # None on a fresh run
    ...
    if ckpt.should_save(step) or stop(step):
      ckpt.save(step, state, data_iter.get_state(), force=stop(step), extra={"config": ...})
    ckpt.close()

Layout (orbax `CheckpointManager`): DIR/<step>/{state, data, extra}, one folder per step. `state` is an orbax
`StandardSave` of the TrainState (sharded arrays, restorable onto any mesh from an abstract state carrying the
target shardings); `data` and `extra` are JSON written by orbax (the primary process), never by hand.

Integrity, in three layers:
- A kill mid-save leaves only `<step>.orbax-checkpoint-tmp-*`: orbax writes there and renames on commit, never
  lists such folders as steps, and removes them when the next manager starts (`cleanup_tmp_directories`).
- A committed folder can still be damaged (truncated files, a missing item, a disk swapped under it). `restore`
  tries the newest step first and falls back to older ones; folders that failed while an older one restored are
  renamed `<step>.corrupt` (kept for inspection, invisible to orbax) so the resumed run can save those steps again.
  If every step fails, the cause is more likely the caller (a different model config) than the disk, so it
  raises instead of renaming anything.
- No checkpoint holding NaN/inf is written: `save` raises `NonFiniteStateError` naming the leaves. The train step
  already skips non-finite updates, so a non-finite state means something is broken; halting keeps the last good
  checkpoint as the newest one, where skipping silently would let the run burn compute with nothing to resume.
  `restore` applies the same check and treats a non-finite checkpoint as damaged.

Preemption: `install_preemption_handler()` returns a `PreemptionGuard`; `guard(step)` turns True once SIGTERM or
SIGINT arrived, so the loop saves (force=True) and exits at the next step boundary. See `PreemptionGuard` for how
processes agree on the step in multi-process runs.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from internlm_jax.config import ModelConfig
from internlm_jax.hf_io import CheckpointError
from internlm_jax.model import param_shardings
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules
from internlm_jax.train.state import TrainState, create_train_state, train_state_shardings

ITEMS = ("state", "data", "extra")
CORRUPT_SUFFIX = ".corrupt"

__all__ = ["CheckpointManager", "CheckpointError", "NonFiniteStateError", "PreemptionGuard",
           "abstract_train_state", "install_preemption_handler"]


class NonFiniteStateError(CheckpointError):
  """A TrainState holding NaN or inf was handed to `save`; nothing was written."""


def abstract_train_state(config: ModelConfig, tx: optax.GradientTransformation, mesh=None,
                         rules: ShardingRules = DEFAULT_RULES) -> TrainState:
  """The TrainState as ShapeDtypeStructs with target shardings (one local device without a mesh); allocates
  nothing. Pass it to `CheckpointManager.restore` to restore onto that mesh."""
  shapes = jax.eval_shape(lambda: create_train_state(config, tx, seed=0, rules=rules))
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: single, shapes)
  else:
    shardings = train_state_shardings(shapes, tx, mesh, param_shardings(config, mesh, rules))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _finite_flags(leaves):
  # One bool per leaf, computed on device: the host reads len(leaves) bools, not the state.
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


@functools.lru_cache(maxsize=8)
def _finite_flags_fn(replicated):
  # Pinning the output replicated lets every process read it from a local shard in multi-process runs.
  return jax.jit(_finite_flags, out_shardings=replicated)


def _nonfinite_leaves(state) -> list[str]:
  """Key paths of the floating leaves of `state` that hold a NaN or inf."""
  paths, leaves = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      paths.append(jax.tree_util.keystr(path))
      leaves.append(leaf)
  if not leaves:
    return []
  sharding = getattr(leaves[0], "sharding", None)
  replicated = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None
  flags = np.asarray(_finite_flags_fn(replicated)(leaves).addressable_data(0))
  return [p for p, ok in zip(paths, flags) if not ok]


def _all_processes(ok: bool) -> bool:
  """True only if `ok` holds on every process, so all of them take the same branch."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _check_json(value, what: str) -> None:
  # Fail here, in the caller's frame; an async save would only report it later from a background thread.
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{what} must be JSON-serializable: {e}") from None


class CheckpointManager:
  """Saves and restores (TrainState, data-iterator state, extra JSON) under one directory; see the module doc.

  Every process must call `save`, `restore`, `wait` and `close` (orbax coordinates the writes).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True):
    if save_every < 1:
      raise CheckpointError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise CheckpointError(f"keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(os.fspath(directory))  # orbax wants absolute paths
    self.save_every = int(save_every)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=self.save_every,
        # Orbax's default policy also saves the first step of a fresh run (InitialSavePolicy); we want exactly
        # every `save_every` steps, plus JAX's preemption sync point.
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(self.save_every),
                                                     policies.PreemptionCheckpointingPolicy()]),
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True)  # half-written saves of a killed run
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._closed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (including in-flight async saves)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step; `restore` may still fall back past it if it turns out damaged."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """True on multiples of `save_every` newer than the latest checkpoint (and at a JAX preemption sync point)."""
    return self._manager.should_save(int(step))

  def save(self, step: int, state: TrainState, data_state: dict | None = None, *, force: bool = False,
           extra: dict | None = None) -> bool:
    """Starts saving `state` (plus the data iterator's state and `extra`) as `step`; True if a save started.

    Without `force`, saves only where `should_save(step)`; with it, saves any step. A step that already has a
    checkpoint is left alone (False): e.g. a preemption save right after the interval save of the same step.
    With async saving this returns once the arrays are copied off the devices, so `state` may be donated next;
    call `wait()` before relying on the files. Raises `NonFiniteStateError` (writing nothing) if any floating
    leaf of `state` holds NaN or inf.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not force and not self.should_save(step):
      return False
    _check_json(data_state, "data_state")
    _check_json(extra, "extra")
    bad = _nonfinite_leaves(state)
    if bad:
      shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
      raise NonFiniteStateError(f"refusing to checkpoint step {step}: NaN/inf in {shown}; nothing written "
                                f"(newest checkpoint: step {self.latest_step()})")
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              extra=ocp.args.JsonSave(extra))
    return bool(self._manager.save(step, args=args, force=True))

  def restore(self, abstract_state: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict | None, dict | None] | None:
    """(state, data_state, extra) of the newest good checkpoint, or of `step`; None when there is none.

    `abstract_state`: the TrainState as ShapeDtypeStructs carrying the target shardings (`abstract_train_state`);
    the arrays come back with exactly those shardings, whatever mesh the checkpoint was saved from. Without
    `step`, damaged checkpoints are skipped (with a warning) for the next older one and renamed
    `<step>.corrupt`; raises CheckpointError if checkpoints exist but none can be restored. With `step`,
    raises CheckpointError if that one is missing or damaged.
    """
    self.wait()
    self._manager.reload()  # the disk may have changed under us (another run, a manual fix)
    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None:
      step = int(step)
      if step not in steps:
        raise CheckpointError(f"{self.directory}: no checkpoint for step {step}; have {sorted(steps)}")
      result, error = self._try_restore(abstract_state, step)
      if error is not None:
        raise CheckpointError(f"{self.directory}: checkpoint step {step} cannot be restored: {error}")
      return result
    failed = []
    for candidate in steps:
      result, error = self._try_restore(abstract_state, candidate)
      if error is None:
        if failed:
          self._quarantine([s for s, _ in failed])
          logging.warning("%s: resumed from step %d, skipping damaged step(s) %s", self.directory, candidate,
                          [s for s, _ in failed])
        return result
      logging.warning("%s: checkpoint step %d cannot be restored (%s); trying an older one", self.directory,
                      candidate, error)
      failed.append((candidate, error))
    if not failed:
      return None
    raise CheckpointError(f"{self.directory}: none of the checkpoints {sorted(steps)} can be restored (does "
                          "the model/optimizer config match the saved run? a different one needs a new workdir); "
                          f"newest error: {failed[0][1]}")

  def restore_or_init(self, abstract_state: TrainState, init) -> tuple[TrainState, Any]:
    """(state, data-iterator state or None): the newest good checkpoint, else `init()` (a fresh run)."""
    restored = self.restore(abstract_state)
    if restored is None:
      return init(), None
    state, data_state, _ = restored
    logging.info("resumed from step %d", int(state.step))
    return state, data_state

  def _try_restore(self, abstract_state, step: int):
    """((state, data, extra), None) or (None, a one-line reason); every process gets the same verdict."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                              extra=ocp.args.JsonRestore())
    result, error = None, None
    try:
      restored = self._manager.restore(step, args=args)
      # orbax/tensorstore raise many types for damaged files (ValueError, KeyError, OSError, ...): any
      # exception here means this step is unusable.
      bad = _nonfinite_leaves(restored.state)
      if bad:
        error = f"NaN/inf in {', '.join(bad[:3])}"
      else:
        result = (restored.state, restored.data, restored.extra)
    except Exception as e:  # noqa: BLE001
      error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if not _all_processes(error is None):
      return None, error or "failed on another process"
    return result, None

  def _quarantine(self, steps: list[int]) -> None:
    """Renames damaged step folders out of orbax's sight, so the resumed run can write those steps again."""
    if jax.process_index() == 0:
      for step in steps:
        source = os.path.join(self.directory, str(step))
        target = source + CORRUPT_SUFFIX
        n = 1
        while os.path.exists(target):
          target = f"{source}{CORRUPT_SUFFIX}{n}"
          n += 1
        os.rename(source, target)
        logging.warning("%s: moved damaged checkpoint to %s", self.directory, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("internlm_jax.checkpoint.quarantine")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is committed on disk (raises if a background save failed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases orbax's threads; safe to call twice."""
    if not self._closed:
      self._closed = True
      self._manager.wait_until_finished()
      self._manager.close()


class PreemptionGuard:
  """Records SIGTERM/SIGINT so the training loop can save and exit at the next step boundary.

      with PreemptionGuard() as stop:       # or: stop = install_preemption_handler()
        for step in ...:
          ...
          if stop(step): save(force=True); break

  One process: Python signal handlers set a flag; `stop(step)` returns it. A second SIGINT raises
  KeyboardInterrupt at once (an impatient Ctrl-C still works).

  Several processes must agree on the step, or one would wait forever in a collective the others skipped:
  - SIGTERM goes through JAX's preemption service (on by default with `jax.distributed.initialize`; it installs
    its own SIGTERM notifier, so we install none): `multihost_utils.reached_preemption_sync_point(step)` turns
    True on every process at the same step. It needs `step`, passed on every call by every process.
  - SIGINT (and SIGTERM when that service is off) sets a local flag that all processes vote on each call, a tiny
    all-gather per step.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._received: int | None = None
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    self._jax_owns_sigterm = self._multi and bool(jax.config.jax_enable_preemption_service)

  def install(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard: not on the main thread, so no signal handlers; preemption goes unnoticed")
      return self
    for sig in self._signals:
      if sig == signal.SIGTERM and self._jax_owns_sigterm:
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    """Puts back the handlers that were there before `install`."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def __enter__(self) -> "PreemptionGuard":
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()
    return False

  def _handle(self, signum, frame):  # noqa: ARG002
    if self._received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self._received = signum
    logging.warning("received %s: saving a checkpoint and stopping at the next step boundary",
                    signal.Signals(signum).name)

  @property
  def received(self) -> bool:
    """Whether this process got a signal (no cross-process agreement; use the call for decisions)."""
    return self._received is not None

  def __call__(self, step: int | None = None) -> bool:
    """True when the loop should save and stop after `step` (the same answer on every process)."""
    if not self._multi:
      return self._received is not None
    if self._jax_owns_sigterm and step is not None:
      try:
        if multihost_utils.reached_preemption_sync_point(int(step)):
          return True
      except RuntimeError:  # the service was not started (e.g. no jax.distributed.initialize)
        pass
    return not _all_processes(self._received is None)


def install_preemption_handler() -> PreemptionGuard:
  """Installs SIGTERM/SIGINT handlers for the rest of the process; returns the guard (call it each step)."""
  return PreemptionGuard().install()
