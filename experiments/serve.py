r"""OpenAI-compatible server for an InternLM2 checkpoint (like `lmdeploy serve api_server`).

  python experiments/serve.py --checkpoint=HF_OR_PARAMS_DIR [--port=23333] [--tensor=2] [--max_slots=32]
  python experiments/serve.py --checkpoint=BASE_DIR --adapter=WORKDIR/adapter   # a LoRA fine-tune, merged at start
  python experiments/serve.py --checkpoint=BASE_DIR --adapters=sql=A/adapter,chat=B/adapter   # several, per request
  python experiments/serve.py --preset=tiny --tokenizer=tok.model      # random weights, for smoke tests

Endpoints: GET /health, GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions, POST /v1/encode,
GET /metrics
(Prometheus; off with --nometrics) (see internlm_jax/serve/api.py). A full queue answers 429; the KV cache is
sized once at start-up from --kv_cache_fraction of free device memory (on CPU: of the host's available memory;
or --num_pages), so memory use never grows while serving.
"""
from __future__ import annotations

import errno
import logging as std_logging
import os
import socket
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF InternLM2 folder, params checkpoint folder or training "
                                  "workdir (its newest checkpoint).")
_PRESET = flags.DEFINE_string("preset", None, "Serve random weights of this preset (no --checkpoint).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "sentencepiece model; default CHECKPOINT/tokenizer.model.")
_ADAPTER = flags.DEFINE_string("adapter", None, "PEFT LoRA adapter folder (experiments/finetune.py's WORKDIR/adapter) "
                               "merged into the base at start-up, before --dtype and --quant.")
_ADAPTERS = flags.DEFINE_list("adapters", [], "LoRA adapters served beside the base, NAME=DIR items (LMDeploy's "
                               "--adapters): a request's `model` NAME decodes with that adapter, batched with the rest.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Name clients pass as `model`; default the folder name (the "
                                  "--adapter folder's with an adapter).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0 for all).")
_PORT = flags.DEFINE_integer("port", 23333, "Port.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Cast weights and compute.")
_QUANT = flags.DEFINE_enum("quant", None, ["int8", "int4"], "Quantize matmul weights (int8 per channel, int4 "
                           "group-wise).")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Tensor-parallel degree (over kv heads).")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 16, "Sequences decoded together (max running requests).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 128, "Requests that may wait for a slot; past it: 429.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", None, "Context per sequence; default the model's.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_NUM_PAGES = flags.DEFINE_integer("num_pages", None, "KV pages in the pool (overrides --kv_cache_fraction).")
_KV_FRACTION = flags.DEFINE_float("kv_cache_fraction", 0.8, "Share of free device memory (CPU: the host's "
                                  "available memory) for the KV cache.")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", None, ["int8", "int4"],
                              "Quantized KV cache: int8 (per-token scales) or int4 (per-token scales and zero "
                              "points, two values a byte).")
_STEPS = flags.DEFINE_integer("steps_per_call", 8, "Decode steps per host round trip.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "Longest prefill piece (power of two).")
_NO_PREFIX_CACHE = flags.DEFINE_bool("no_prefix_cache", False, "Disable sharing of prompt-prefix pages.")
_METRICS = flags.DEFINE_bool("metrics", True, "Serve Prometheus metrics at GET /metrics (--nometrics: a 404).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import uvicorn

  from internlm_jax.serve import loading
  from internlm_jax.serve.api import create_app
  from internlm_jax.serve.engine import EngineConfig
  from internlm_jax.serve.scheduler import Scheduler

  std_logging.getLogger("internlm_jax").setLevel(std_logging.INFO)
  checkpoint = _CHECKPOINT.value
  if not checkpoint and not _PRESET.value:
    sys.exit("error: pass --checkpoint=DIR (HF InternLM2 folder or params checkpoint) or --preset=NAME")
  if checkpoint and not os.path.isdir(checkpoint):
    sys.exit(f"error: --checkpoint={checkpoint} is not a folder (an HF InternLM2 folder, a params checkpoint "
             "or a training workdir)")
  try:
    check_port(_HOST.value, _PORT.value)  # before loading: a big model takes minutes to load
    tokenizer = loading.find_tokenizer(checkpoint, _TOKENIZER.value)
    mesh = loading.serving_mesh(_TENSOR.value)
    config, params = loading.load_model(checkpoint, preset=_PRESET.value, mesh=mesh, dtype=_DTYPE.value,
                                        quant=_QUANT.value, adapter=_ADAPTER.value)
    adapter_names, adapters = loading.load_served_adapters(_ADAPTERS.value, config,
                                                           base=checkpoint or f"preset {_PRESET.value}", mesh=mesh)
  except (OSError, ValueError) as e:  # a busy port; a missing tokenizer or preset; a malformed checkpoint
    sys.exit(f"error: {e}")
  ec = EngineConfig(max_slots=_MAX_SLOTS.value, max_seq_len=_MAX_SEQ_LEN.value, page_size=_PAGE_SIZE.value,
                    num_pages=_NUM_PAGES.value, kv_dtype=_KV_DTYPE.value, prefill_chunk=_PREFILL_CHUNK.value,
                    steps_per_call=_STEPS.value, prefix_caching=not _NO_PREFIX_CACHE.value,
                    sample_vocab=min(tokenizer.vocab_size, config.vocab_size))
  engine = loading.build_engine(config, params, ec, mesh=mesh, tensor=_TENSOR.value,
                                kv_fraction=_KV_FRACTION.value, adapters=adapters)
  scheduler = Scheduler(engine, tokenizer, max_queue=_MAX_QUEUE.value).start()
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_ADAPTER.value or checkpoint or _PRESET.value))
  if name in adapter_names:
    scheduler.stop()
    sys.exit(f"error: --adapters name {name!r} is the base model's name too; pick another (or --model_name)")
  logging.info("serving %s on http://%s:%d/v1", ", ".join((name,) + adapter_names), _HOST.value, _PORT.value)
  try:
    uvicorn.run(create_app(scheduler, tokenizer, name, metrics=_METRICS.value, adapter_names=adapter_names),
                host=_HOST.value, port=_PORT.value, log_level="info")
  finally:
    scheduler.stop()


def check_port(host: str, port: int) -> None:
  """Raises OSError, naming the address, when uvicorn could not listen there."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
      s.bind((host, port))
    except OSError as e:
      hint = " (another server is running there: pick another --port)" if e.errno == errno.EADDRINUSE else ""
      raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None


if __name__ == "__main__":
  app.run(main)
