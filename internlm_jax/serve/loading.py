"""Loading a model for serving: checkpoint folder detection, tokenizer lookup, mesh and KV-cache sizing.

Shared by experiments/serve.py and experiments/chat.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax

from internlm_jax import lora_io
from internlm_jax.config import ModelConfig, from_hf_config, get_preset
from internlm_jax.hf_io import load_hf_checkpoint
from internlm_jax.model import init_params
from internlm_jax.params_io import CONFIG_FILE, read_config, load_params_checkpoint
from internlm_jax.quant import nbytes as quant_nbytes
from internlm_jax.quant import quantize_params
from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.kv_cache import bytes_per_page
from internlm_jax.sharding import make_mesh
from internlm_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def find_tokenizer(checkpoint: str | None, tokenizer: str | None) -> Tokenizer:
  for candidate in (tokenizer, checkpoint and os.path.join(checkpoint, "tokenizer.model")):
    if candidate and os.path.exists(candidate):
      return Tokenizer(candidate)
  raise FileNotFoundError(f"no tokenizer: {checkpoint!r} has no tokenizer.model; pass --tokenizer=FILE.model")


def serving_mesh(tensor: int):
  """A mesh with only the tensor axis (tensor parallel over kv heads) on the first `tensor` devices."""
  if tensor <= 1:
    return None
  devices = jax.devices()
  if len(devices) < tensor:
    raise ValueError(f"--tensor={tensor} needs {tensor} devices, {len(devices)} available")
  return make_mesh(data=1, fsdp=1, tensor=tensor, sequence=1, devices=devices[:tensor])


def load_model(checkpoint: str | None, *, preset: str | None = None, mesh=None, dtype: str | None = None,
               quant: str | None = None, seed: int = 0, adapter: str | None = None) -> tuple[ModelConfig, dict]:
  """(config, params) from an HF InternLM2 folder (config.json + safetensors), a params checkpoint folder
  (model_config.json + params/) or a training workdir (model_config.json + checkpoints/: its newest); with
  `preset` and no checkpoint, random weights (benchmarks, smoke tests).
  `adapter`, a PEFT LoRA folder (lora_io.save_adapter; experiments/finetune.py's WORKDIR/adapter), is checked against
  the base before its weights load and merged in float32 before the `dtype` cast and quantization (lora_io.py).
  `quant` "int8" (per channel) or "int4" (group-wise) quantizes the matmul weights (see quant.py)."""
  base = checkpoint or f"preset {preset}"
  if adapter:  # a wrong adapter is one line now, not after minutes of loading a big base
    config = _base_config(checkpoint, preset)
    if config is not None:
      lora_io.check_adapter_folder(adapter, config, base=base)
  config, params = _load(checkpoint, preset, mesh, dtype, seed, cast=not adapter)
  if adapter:
    params = lora_io.merge_adapter_folder(adapter, config, params, base=base, dtype=config.param_dtype, mesh=mesh,
                                          donate=True)
  if quant:
    params = quantize_params(params, quant)
    log.info("weights quantized to %s: %.2f GiB", quant, quant_nbytes(params) / 2**30)
  return config, params


def _base_config(checkpoint, preset) -> ModelConfig | None:
  """The base's config without its weights; None where _load will name what is wrong."""
  if checkpoint is None:
    return get_preset(preset) if preset else None
  if os.path.isfile(os.path.join(checkpoint, "config.json")):
    return from_hf_config(checkpoint)
  if os.path.isfile(os.path.join(checkpoint, CONFIG_FILE)):
    return read_config(os.path.join(checkpoint, CONFIG_FILE))
  return None


def _load(checkpoint, preset, mesh, dtype, seed, cast=True):
  """`cast` False leaves an HF folder's weights in their stored dtype (config.param_dtype still says `dtype`)
  for an adapter merge that casts them."""
  if checkpoint is None:
    if preset is None:
      raise ValueError("pass --checkpoint=DIR (HF InternLM2 folder or params checkpoint) or --preset=NAME")
    config = get_preset(preset)
    if dtype:
      config = config.replace(dtype=dtype, param_dtype=dtype)
    return config, init_params(config, jax.random.key(seed), mesh=mesh)
  if os.path.isfile(os.path.join(checkpoint, "config.json")):
    config, params = load_hf_checkpoint(checkpoint, mesh=mesh, dtype=dtype if cast else None)
    if dtype and not cast:
      config = config.replace(param_dtype=dtype)
  elif os.path.isfile(os.path.join(checkpoint, CONFIG_FILE)):
    config, params = load_params_checkpoint(checkpoint, mesh=mesh)
  else:
    raise FileNotFoundError(f"{checkpoint}: neither an HF InternLM2 folder (config.json) nor a params checkpoint "
                            f"or training workdir ({CONFIG_FILE})")
  if dtype:  # compute in the weights' dtype
    config = config.replace(dtype=dtype)
  elif config.param_dtype != config.dtype:
    config = config.replace(dtype=config.param_dtype)
  return config, params


def kv_budget_bytes(fraction: float, tensor: int) -> int | None:
  """`fraction` of the first device's free memory, times the devices the pages are split over. CPU devices
  report no memory: there the host's available memory (after the weights loaded) is the budget, so a long
  context times many slots cannot ask for more RAM than the machine has. None when neither is known."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return int(free * fraction) * max(tensor, 1)
  if getattr(device, "platform", None) == "cpu":
    available = host_available_bytes()
    return None if available is None else int(available * fraction)  # CPU "devices" share the one host
  return None


def host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (Linux): free memory plus what the kernel can reclaim."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def load_served_adapters(specs, config: ModelConfig, *, base: str, mesh=None) -> tuple[tuple[str, ...], list]:
  """`--adapters` items "NAME=DIR" (LMDeploy's form) -> (names, [(LoraConfig, adapter tree)]) for
  Engine(adapters=...): each folder checked against the base first (lora_io), names unique and non-empty."""
  names, loaded = [], []
  for spec in specs:
    name, sep, path = str(spec).partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--adapters item {spec!r}: expected NAME=DIR (e.g. sql=runs/lora_sql/adapter)")
    if name in names:
      raise ValueError(f"--adapters names {name!r} twice")
    lora_io.check_adapter_folder(path, config, base=base)
    names.append(name)
    loaded.append(lora_io.load_adapter(path, config, mesh=mesh))
    log.info("serving LoRA adapter %s as model %r (rank %d)", path, name, loaded[-1][0].rank)
  return tuple(names), loaded


def build_engine(config: ModelConfig, params, engine_config: EngineConfig, *, mesh=None, tensor: int = 1,
                 kv_fraction: float = 0.8, adapters=()) -> Engine:
  ec = engine_config
  if ec.num_pages is None and ec.kv_budget_bytes is None:
    budget = kv_budget_bytes(kv_fraction, tensor)
    if budget is not None:
      max_len = ec.max_seq_len or config.max_position_embeddings
      full = ec.max_slots * -(-max_len // ec.page_size) + 1
      per_page = bytes_per_page(config, ec.page_size, ec.kv_dtype)
      ec = dataclasses.replace(ec, num_pages=max(2, min(full, budget // per_page)))
  engine = Engine(params, config, ec, mesh=mesh, adapters=adapters)
  alloc = engine.allocator
  log.info("KV cache: %d pages of %d tokens (%.2f GiB, %s), %d slots, context %d", alloc.num_pages, ec.page_size,
           alloc.num_pages * bytes_per_page(config, ec.page_size, ec.kv_dtype) / 2**30,
           ec.kv_dtype or config.dtype, ec.max_slots, engine.max_seq_len)
  return engine
