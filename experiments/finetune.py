"""Fine-tunes an InternLM2 model (full, LoRA, QLoRA or DPO); rerunning the same command resumes.

  python experiments/train.py --config=configs/pretrain_tiny.py --workdir=/tmp/tiny        # a base model
  python experiments/finetune.py --config=configs/sft_lora_tiny.py --workdir=/tmp/tiny_lora \
      --config.base.checkpoint=/tmp/tiny
  python experiments/finetune.py --config=configs/sft_qlora_tiny.py --workdir=DIR --config.base.checkpoint=HF_DIR \
      --config.data.source=files --config.data.train_paths=train.jsonl --config.data.eval_paths=dev.jsonl

Writes DIR/checkpoints/, DIR/metrics.jsonl, DIR/summary.json, DIR/hf (merged HF folder) and DIR/adapter (PEFT).
With multiple-choice held-out data (the built-in Shakespeare tasks) it prints the held-out accuracy before and
after; DPO with held-out pairs prints their reward accuracy, loss and reward margin before and after.
`--cpu_devices` simulates devices on a CPU-only machine.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from _launch import define_config, parse_flags, simulate_cpu_devices  # noqa: E402  (the script folder is on sys.path)

simulate_cpu_devices(sys.argv)

from absl import app, flags, logging  # noqa: E402
from internlm_jax import host_memory  # noqa: E402

_CONFIG = define_config("configs/sft_lora_tiny.py", "ml_collections config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints/, metrics.jsonl, hf/, adapter/",
                               required=True)
flags.DEFINE_integer("cpu_devices", 8, "simulated CPU devices when no accelerator is present (0 = leave as is)")


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv):
  host_memory.reuse_freed_memory()  # before the first computation (internlm_jax/host_memory.py)
  del argv
  from internlm_jax.config import ConfigError
  from internlm_jax.data.sources import DataError
  from internlm_jax.finetune import run
  from internlm_jax.hf_io import CheckpointError
  from internlm_jax.lora import LoraError
  from internlm_jax.sharding import ShardingError, initialize_distributed
  from internlm_jax.tokenizer import TokenizerError
  from internlm_jax.train.loop import TrainingHalted

  initialize_distributed()
  logging.set_verbosity(logging.WARNING)
  try:
    summary = run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, CheckpointError, LoraError, ShardingError, TokenizerError, TrainingHalted) as e:
    sys.exit(f"error: {e}")
  import jax
  if jax.process_index() != 0:
    return
  if summary.get("stopped"):
    print(f"stopped at step {summary['step']}; rerun the same command to resume")
    return
  loss = "" if summary["loss"] is None else f"loss {summary['loss']:.3f}, "
  print(f"\n{summary['method']} fine-tune finished at step {summary['step']}: {loss}"
        f"tokens/s {summary.get('tokens_per_sec') or 0:,.0f}, {summary['trainable_params']:,} trainable params")
  # run() logs the data summary at INFO, which this script's WARNING verbosity hides.
  from internlm_jax.data.sft import SFTSummary
  print(f"data: {SFTSummary(**summary['data'])}")
  pairs = summary.get("heldout_pairs")
  if pairs:  # DPO / ORPO: eval_loss is the preference loss (config.dpo.loss_type), reported with the rewards
    before, after = pairs["before"] or {}, pairs["after"]
    num = lambda m, k: "n/a" if m.get(k) is None else f"{m[k]:.3f}"
    print(f"held-out pairs ({after['pairs']}): reward accuracy before {_pct(before.get('reward_accuracy'))}, "
          f"after {_pct(after['reward_accuracy'])}; preference loss {num(before, 'loss')} -> {num(after, 'loss')}; "
          f"reward margin {num(before, 'reward_margin')} -> {num(after, 'reward_margin')} "
          f"(chosen {num(after, 'chosen_reward')}, rejected {num(after, 'rejected_reward')})")
  elif summary.get("eval_loss") is not None:
    print(f"held-out loss {summary['eval_loss']:.3f} nats/trained token")
  before, after = summary["heldout"]["before"], summary["heldout"]["after"]
  if before and after:
    print(f"held-out accuracy: before {_pct(before['accuracy'])}, after {_pct(after['accuracy'])} "
          f"({after['n']} examples, chance {_pct(after['chance'])})")
    for task in after["by_task"]:
      print(f"  {task}: before {_pct(before['by_task'].get(task))}, after {_pct(after['by_task'][task])}")
  for kind, path in summary["outputs"].items():
    print(f"{kind} output: {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
