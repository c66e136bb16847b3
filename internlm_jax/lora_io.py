"""A saved LoRA adapter folder merged into a loaded base model: serving, chat and evaluation of a fine-tune without
exporting a merged folder first (`--adapter=DIR` of experiments/serve.py, chat.py and evaluate.py, as
`xtuner chat LLM --adapter A` and LMDeploy's `--adapters`).

`check_adapter_folder` compares the folder (lora.save_adapter's PEFT names) with the base from the safetensors
header alone, no tensor data: hidden size, layer count, then every tensor's rank and width, and names the first
mismatch in one line. `merge_adapter_folder` then loads it (lora.load_adapter) and merges W + (alpha / r) * a @ b
in float32 (lora.merge) into the weights it is given, before the caller casts or quantizes them. As PEFT's
merge_and_unload, a QLoRA adapter is merged into the full-precision base given here, not its NF4 rounding.
"""
from __future__ import annotations

import logging
import os
import re

import jax
import jax.numpy as jnp

from internlm_jax.config import ModelConfig
from internlm_jax.lora import (_PEFT_PREFIX, ADAPTER_CONFIG, ADAPTER_WEIGHTS, TARGETS, LoraConfig, LoraError, Params,
                               _get, _with, load_adapter, merge, read_adapter_config)

log = logging.getLogger(__name__)

# The widths of each target's PEFT pair, lora_A [r, in] and lora_B [out, r] (lora.py's table), by name.
_WIDTHS = {"wqkv": ("hidden", "q/k/v width"), "wo": ("attention width", "hidden"), "w1": ("hidden", "mlp"),
           "w3": ("hidden", "mlp"), "w2": ("mlp", "hidden"), "output": ("hidden", "vocab")}
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_WHAT = "a PEFT LoRA folder with adapter_config.json and adapter_model.safetensors, e.g. experiments/finetune.py's " \
        "WORKDIR/adapter"


def _pair(name: str, layer: int | None) -> tuple[str, str]:
  key = _PEFT_PREFIX + TARGETS[name][3].format(i=layer)
  return key + ".lora_A.weight", key + ".lora_B.weight"


def check_adapter_folder(path: str | os.PathLike, config: ModelConfig, *, base: str = "the base") -> LoraConfig:
  """The LoraConfig of the adapter at `path` once it is known to fit `config` (the model `base` names);
  FileNotFoundError (no folder or files) or LoraError (a ValueError) naming the folder and the mismatch."""
  from safetensors import safe_open  # noqa: PLC0415  (only adapter I/O needs it)
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"adapter {folder}: no such folder (expected {_WHAT})")
  for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
    if not os.path.isfile(os.path.join(folder, name)):
      raise FileNotFoundError(f"adapter {folder} has no {name} (expected {_WHAT})")
  try:
    lcfg, raw = read_adapter_config(folder)
  except ValueError as e:  # LoraError names the file; a JSON syntax error does not
    raise LoraError(str(e) if folder in str(e) else f"{os.path.join(folder, ADAPTER_CONFIG)}: {e}") from None
  weights = os.path.join(folder, ADAPTER_WEIGHTS)
  try:
    with safe_open(weights, "numpy") as f:
      shapes = {k.replace(".default.weight", ".weight"): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  except Exception as e:  # noqa: BLE001  (safetensors raises its own error type for a damaged header)
    raise LoraError(f"{weights}: not a readable safetensors file ({e})") from None

  trained = raw.get("base_model_name_or_path")
  fix = "; pass the base model it was fine-tuned from" + (f" ({trained})" if trained else "")
  mismatch = lambda got, want: LoraError(f"adapter {folder} was trained for {got}, base {base} has {want}{fix}")
  widths = {"hidden": config.hidden_size, "attention width": config.num_heads * config.head_dim,
            "q/k/v width": (config.num_heads + 2 * config.num_kv_heads) * config.head_dim,
            "mlp": config.intermediate_size, "vocab": config.vocab_size}
  # A wrong base is the usual mistake: say so by its hidden size and depth before naming any one tensor.
  for name in lcfg.targets:
    a_key, b_key = _pair(name, 0)
    w_in, w_out = _WIDTHS[name]
    found = (shapes.get(a_key, ())[1:2] if w_in == "hidden" else ()) + (
        shapes.get(b_key, ())[:1] if w_out == "hidden" else ())
    if found and found[0] != config.hidden_size:
      raise mismatch(f"hidden {found[0]}", config.hidden_size)
    if found:
      break
  layers = {int(m.group(1)) for k in shapes if (m := _LAYER.search(k))}
  if layers and max(layers) + 1 != config.num_layers:
    raise mismatch(f"{max(layers) + 1} layers", config.num_layers)
  used = set()
  for name in lcfg.targets:
    w_in, w_out = _WIDTHS[name]
    for layer in range(config.num_layers) if TARGETS[name][0][0] == "layers" else [None]:
      for key, rank_axis, width in zip(_pair(name, layer), (0, 1), (w_in, w_out)):
        got = shapes.get(key)
        if got is None:
          raise LoraError(f"adapter {folder} has no tensor {key} (its target_modules: {list(lcfg.targets)})")
        used.add(key)
        if len(got) != 2:
          raise LoraError(f"adapter {folder} tensor {key} has shape {list(got)}, expected a matrix")
        if got[rank_axis] != lcfg.rank:
          raise LoraError(f"adapter {folder} tensor {key} has rank {got[rank_axis]}, its {ADAPTER_CONFIG} says "
                          f"r={lcfg.rank}")
        if got[1 - rank_axis] != widths[width]:
          raise mismatch(f"{width} {got[1 - rank_axis]}", widths[width])
  extra = sorted(set(shapes) - used)
  if extra:
    raise LoraError(f"adapter {folder} has tensors outside its target_modules {list(lcfg.targets)}: {extra[:3]}")
  return lcfg


def merge_adapter_folder(path: str | os.PathLike, config: ModelConfig, params: Params, *, base: str = "the base",
                         dtype: str | None = None, mesh=None, donate: bool = False) -> Params:
  """`params` with the adapter at `path` merged, after check_adapter_folder: each targeted weight becomes
  W + (alpha / r) * a @ b, computed in float32 from W as given and then cast to `dtype` (default: W's dtype);
  with `dtype` every other leaf is cast too. Results keep the shardings of `params`. `donate` lets the merge
  reuse the buffers of `params` (then invalid), so a big model is not held twice."""
  lcfg = check_adapter_folder(path, config, base=base)
  _, lora = load_adapter(path, config, mesh=mesh)

  def merged(params, lora):
    up = params
    for name in lcfg.targets:  # merge's float32 sum, kept float32 until the cast below
      up = _with(up, TARGETS[name][0], _get(params, TARGETS[name][0]).astype(jnp.float32))
    return jax.tree.map(lambda m, w: m.astype(dtype or w.dtype), merge(up, lora, lcfg), params)

  donate = donate and all(x.dtype == jnp.dtype(dtype or x.dtype) for x in jax.tree.leaves(params))  # else no reuse
  out = jax.jit(merged, out_shardings=jax.tree.map(lambda x: x.sharding, params),
                donate_argnums=(0,) if donate else ())(params, lora)
  log.info("merged LoRA adapter %s into %s: targets %s, rank %d, alpha %g (scale %g)", os.fspath(path), base,
           ",".join(lcfg.targets), lcfg.rank, lcfg.alpha, lcfg.scale)
  return out
