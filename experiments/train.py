"""Pretrains an InternLM2 model; rerunning the same command resumes from the newest good checkpoint.

  python experiments/train.py --config=configs/pretrain_tiny.py --workdir=/tmp/tiny
  python experiments/train.py --config=configs/pretrain_tiny.py --workdir=/tmp/tiny --config.steps=20 \
      --config.mesh.data=2 --config.mesh.fsdp=4

Multi-host: run the same command on every host (TPU VM workers, SLURM tasks) or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID; `--cpu_devices` simulates devices on a CPU-only machine.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import define_config, parse_flags, simulate_cpu_devices  # noqa: E402  (the script folder is on sys.path)

simulate_cpu_devices(sys.argv)

from absl import app, flags, logging  # noqa: E402
from internlm_jax import host_memory  # noqa: E402

_CONFIG = define_config("configs/pretrain_tiny.py", "ml_collections config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints/, metrics.jsonl, plots", required=True)
flags.DEFINE_integer("cpu_devices", 8, "simulated CPU devices when no accelerator is present (0 = leave as is)")


def main(argv):
  host_memory.reuse_freed_memory()  # before the first computation (internlm_jax/host_memory.py)
  del argv
  from internlm_jax.config import ConfigError
  from internlm_jax.data.sources import DataError
  from internlm_jax.hf_io import CheckpointError
  from internlm_jax.sharding import ShardingError, initialize_distributed
  from internlm_jax.tokenizer import TokenizerError
  from internlm_jax.train.loop import TrainingHalted, run

  initialize_distributed()
  logging.set_verbosity(logging.WARNING)
  try:
    summary = run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, CheckpointError, ShardingError, TokenizerError, TrainingHalted) as e:
    sys.exit(f"error: {e}")
  import jax
  if jax.process_index() != 0:
    return
  if summary.get("preempted"):
    print(f"preempted at step {summary['step']}; rerun the same command to resume")
    return
  if summary.get("tokens_per_sec") is None:
    print(f"\nnothing to train: {_WORKDIR.value} already holds step {summary['step']} (raise --config.steps "
          "to continue, or use a new --workdir)")
  else:
    print(f"\nfinished step {summary['step']}: tokens/s {summary['tokens_per_sec']:,.0f}, "
          f"MFU {summary.get('mfu') or 0:.2f}")
  if summary.get("val_loss") is not None:
    print(f"validation loss {summary['val_loss']:.3f} nats/token vs unigram baseline "
          f"{summary['unigram_val_loss']:.3f}")
  if summary.get("sample"):
    print("sample:\n" + summary["sample"])
  if summary.get("loss_curve"):
    print("loss curve:", summary["loss_curve"])


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
