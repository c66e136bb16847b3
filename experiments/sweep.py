"""Runs a grid of config overrides and tabulates the final validation loss of each run.

  python experiments/sweep.py --config=configs/pretrain_tiny.py --workdir=/tmp/sweep \
      --grid="optimizer.learning_rate=1e-3,3e-3" --grid="batch_size=8,16" --config.steps=60

Each combination trains in WORKDIR/<name>/ (rerunning resumes or skips finished runs); the table goes to
WORKDIR/results.csv and WORKDIR/results.md and is printed.
"""
import copy
import csv
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from absl import app, flags  # noqa: E402
from _launch import define_config, parse_flags  # noqa: E402  (the script folder is on sys.path)
from internlm_jax import host_memory  # noqa: E402

_CONFIG = define_config("configs/pretrain_tiny.py", "base ml_collections config")
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep directory", required=True)
_GRID = flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,... (dotted config key); the grid is the product")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
  axes = []
  for spec in specs:
    if "=" not in spec:
      raise app.UsageError(f"--grid {spec!r}: expected KEY=V1,V2,...")
    key, values = spec.split("=", 1)
    axes.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
  return axes


def _set(cfg, dotted: str, raw: str):
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:  # a missing parent or a bad value would be a KeyError/ValueError traceback
    if not hasattr(node, "keys") or p not in node:
      raise app.UsageError(f"--grid key {dotted!r} is not in the config")
    node = node[p]
  if not hasattr(node, "keys") or leaf not in node:
    raise app.UsageError(f"--grid key {dotted!r} is not in the config")
  current = node[leaf]
  try:
    node[leaf] = type(current)(raw) if not isinstance(current, bool) else raw.lower() in ("1", "true", "yes")
  except (TypeError, ValueError):
    raise app.UsageError(f"--grid {dotted}={raw!r}: expected a {type(current).__name__}") from None


def main(argv):
  host_memory.reuse_freed_memory()  # before the first computation (internlm_jax/host_memory.py)
  del argv
  from internlm_jax.config import ConfigError
  from internlm_jax.data.sources import DataError
  from internlm_jax.hf_io import CheckpointError
  from internlm_jax.sharding import ShardingError
  from internlm_jax.tokenizer import TokenizerError
  from internlm_jax.train.loop import TrainingHalted, run, validate
  axes = parse_grid(_GRID.value)
  # Every combination is built and validated before the first one trains: a bad value in the last one must not
  # fail hours into the sweep.
  runs = []
  for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in axes]):
    cfg = copy.deepcopy(_CONFIG.value)
    for key, value in combo:
      _set(cfg, key, value)
    name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in combo) or "base"
    try:
      validate(cfg)
    except ConfigError as e:
      sys.exit(f"error: {name}: {e}")
    runs.append((combo, cfg, name))
  rows = []
  for combo, cfg, name in runs:
    workdir = os.path.join(_WORKDIR.value, name)
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        summary = json.load(f)
    else:
      cfg.progress = False
      try:
        summary = run(cfg, workdir)
      except (ConfigError, DataError, CheckpointError, ShardingError, TokenizerError, TrainingHalted) as e:
        sys.exit(f"error: {name}: {e}")
      if summary.get("preempted"):  # the signal was for the whole sweep, not only this run
        print(f"preempted in {name} at step {summary['step']}; rerun the same command to resume")
        return
    rows.append({**{k: v for k, v in combo}, "val_loss": summary.get("val_loss"),
                 "tokens_per_sec": summary.get("tokens_per_sec"), "workdir": workdir})
  keys = list(rows[0]) if rows else []
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
  table = "\n".join(lines)
  with open(os.path.join(_WORKDIR.value, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
