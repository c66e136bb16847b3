"""Evaluates a checkpoint (in-process) or any OpenAI-compatible endpoint on the datasets of an eval config.

  python experiments/evaluate.py --config=configs/eval_tiny.py --workdir=/tmp/ev --checkpoint=/tmp/hf_tiny
  python experiments/evaluate.py ... --checkpoint=/tmp/hf_tiny --backend=dense    # generate.py, not the engine
  python experiments/evaluate.py --config=configs/eval_tiny.py --workdir=/tmp/ev \
      --checkpoint=/tmp/tiny --train_config=configs/pretrain_tiny.py          # a training workdir
  python experiments/evaluate.py --config=configs/eval_gsm8k.py --workdir=/tmp/ev \
      --api_base=http://127.0.0.1:23333/v1 --model=internlm2 --tokenizer=/models/internlm2/tokenizer.model
  python experiments/evaluate.py ... --config.datasets.gsm8k.path=/data/gsm8k/test.jsonl --reuse

Writes DIR/predictions/, DIR/results/, DIR/summary.{json,md,csv} and prints the table. Rerunning resumes from
the per-sample cache; --reuse also skips datasets whose results are current.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from _launch import define_config, parse_flags  # noqa: E402  (the script folder is on sys.path)

_CONFIG = define_config("configs/eval_tiny.py", "eval config file (configs/eval_*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "HF folder, params folder or training workdir")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "sentencepiece .model (default: the checkpoint's)")
_TRAIN_CONFIG = flags.DEFINE_string("train_config", "", "the training config of a training workdir checkpoint")
_STEP = flags.DEFINE_integer("step", None, "training step to evaluate (default: the newest good one)")
_ADAPTER = flags.DEFINE_string("adapter", "", "PEFT LoRA adapter folder (finetune.py's WORKDIR/adapter) merged into "
                               "--checkpoint before evaluating")
_BACKEND = flags.DEFINE_enum("backend", "engine", ["engine", "dense"],
                             "--checkpoint generation: the serving engine (paged cache, continuous batching, stop "
                             "strings end decoding) or the dense generate.py path; log-likelihood is the same "
                             "exact forward either way")
_API_BASE = flags.DEFINE_string("api_base", "", "OpenAI-compatible endpoint, e.g. http://127.0.0.1:23333/v1")
_MODEL = flags.DEFINE_string("model", "", "model name at the endpoint (--api_base)")
_API_KEY = flags.DEFINE_string("api_key", "", "bearer token for the endpoint (default: $OPENAI_API_KEY)")
_API_TIMEOUT = flags.DEFINE_float("api_timeout_s", 300.0, "seconds to wait for one endpoint request (a slow "
                                  "generation may need minutes; lower it to fail fast on a stuck server)")
_API_RETRIES = flags.DEFINE_integer("api_retries", 4, "retries of a failed endpoint request (connection errors, "
                                    "429 and 5xx), with backoff")
_NAME = flags.DEFINE_string("name", "", "model column in the summary table (default: derived)")
_REUSE = flags.DEFINE_bool("reuse", False, "skip datasets whose results match the current config and model")
_DATASETS = flags.DEFINE_list("datasets", [], "evaluate only these datasets of the config")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bars")


def _backend(cfg):
  from internlm_jax.eval.backends import InProcessBackend
  from internlm_jax.eval.engine_backend import EngineBackend
  from internlm_jax.eval.openai_backend import OpenAIBackend
  from internlm_jax.tokenizer import Tokenizer

  batch_size = int(cfg.get("batch_size", 8))
  max_length = int(cfg.get("max_length", 0)) or None
  if bool(_API_BASE.value) == bool(_CHECKPOINT.value):
    sys.exit("error: pass exactly one of --checkpoint=DIR or --api_base=URL")
  if _API_BASE.value:
    if _ADAPTER.value:
      sys.exit("error: --adapter needs --checkpoint (an endpoint serves its own model: serve.py --adapter=DIR)")
    if not _MODEL.value:
      sys.exit("error: --api_base needs --model=NAME (the model id the endpoint serves)")
    tokenizer = Tokenizer(_TOKENIZER.value) if _TOKENIZER.value else None
    return OpenAIBackend(_API_BASE.value, _MODEL.value, tokenizer=tokenizer, batch_size=batch_size,
                         api_key=_API_KEY.value or os.environ.get("OPENAI_API_KEY", ""),
                         concurrency=int(cfg.get("concurrency", 4)), max_length=max_length,
                         name=_NAME.value or _MODEL.value, timeout_s=_API_TIMEOUT.value,
                         max_retries=_API_RETRIES.value)
  from internlm_jax.eval.loading import load_model
  config, params, tokenizer, described = load_model(_CHECKPOINT.value, tokenizer=_TOKENIZER.value,
                                                    train_config=_TRAIN_CONFIG.value, step=_STEP.value)
  name = _NAME.value or os.path.basename(os.path.normpath(_CHECKPOINT.value))
  if described.startswith("train:"):
    name = _NAME.value or f"{name}@{described.rsplit('@', 1)[1]}"
  if _ADAPTER.value:
    from internlm_jax.lora_io import merge_adapter_folder
    try:
      params = merge_adapter_folder(_ADAPTER.value, config, params, base=_CHECKPOINT.value, donate=True)
    except (OSError, ValueError) as e:  # no folder or files; an adapter for another base
      sys.exit(f"error: {e}")
    name = _NAME.value or os.path.basename(os.path.normpath(_ADAPTER.value))
    described += f" + adapter {os.path.abspath(_ADAPTER.value)}"
  logging.info("evaluating %s (%s backend)", described, _BACKEND.value)
  backend_class = EngineBackend if _BACKEND.value == "engine" else InProcessBackend
  return backend_class(params, config, tokenizer, name=name, batch_size=batch_size, max_length=max_length)


def main(argv):
  del argv
  from internlm_jax.config import ConfigError
  from internlm_jax.eval import runner
  from internlm_jax.eval.backends import BackendError
  from internlm_jax.eval.datasets import DatasetError
  from internlm_jax.eval.loading import LoadError
  from internlm_jax.eval.tasks import TaskError
  from internlm_jax.eval.templates import TemplateError
  from internlm_jax.hf_io import CheckpointError
  from internlm_jax.tokenizer import TokenizerError

  logging.set_verbosity(logging.WARNING)
  backend = None
  try:
    backend = _backend(_CONFIG.value)
    runner.run(_CONFIG.value, backend, _WORKDIR.value, reuse=_REUSE.value, progress=_PROGRESS.value,
               only=tuple(_DATASETS.value))
  except (BackendError, DatasetError, LoadError, TaskError, TemplateError, ConfigError, CheckpointError,
          TokenizerError) as e:
    sys.exit(f"error: {e}")
  finally:
    if hasattr(backend, "close"):  # EngineBackend: stop the engine's scheduler thread
      backend.close()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
