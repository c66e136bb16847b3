"""LoRA adapter folders: PEFT's layout written and read (`save_adapter`, `load_adapter`), and a saved folder
checked against and merged into a loaded base model, for serving, chat and evaluation of a fine-tune without
exporting a merged folder first (`--adapter=DIR` of experiments/serve.py, chat.py and evaluate.py, as
`xtuner chat LLM --adapter A` and LMDeploy's `--adapters`).

`save_adapter` writes adapter_config.json + adapter_model.safetensors with PEFT's tensor names and torch layouts
(lora.py's table says how each target flattens), loadable with `peft.PeftModel.from_pretrained`; `load_adapter`
reads ours or PEFT's. `check_adapter_folder` compares a folder with the base from the safetensors header alone,
no tensor data: hidden size, layer count, then every tensor's rank and width, and names the first mismatch in one
line. `merge_adapter_folder` then loads it and merges W + (alpha / r) * a @ b in float32 (lora.merge) into the
weights it is given, before the caller casts or quantizes them. As PEFT's merge_and_unload, a QLoRA adapter is
merged into the full-precision base given here, not its NF4 rounding.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.lora import (TARGETS, LoraConfig, LoraError, Params, _get, _with, lora_shardings, lora_specs,
                               merge)
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

# The widths of each target's PEFT pair, lora_A [r, in] and lora_B [out, r] (lora.py's table), by name.
_WIDTHS = {"wqkv": ("hidden", "q/k/v width"), "wo": ("attention width", "hidden"), "w1": ("hidden", "mlp"),
           "w3": ("hidden", "mlp"), "w2": ("mlp", "hidden"), "output": ("hidden", "vocab")}
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_WHAT = "a PEFT LoRA folder with adapter_config.json and adapter_model.safetensors, e.g. experiments/finetune.py's " \
        "WORKDIR/adapter"


# ---- PEFT-compatible adapter folders -------------------------------------------------------------------------
def to_peft_state_dict(config: ModelConfig, lcfg: LoraConfig, lora: Params) -> dict[str, np.ndarray]:
  """{PEFT key: float32 torch-layout array}, e.g. base_model.model.model.layers.0.attention.wqkv.lora_A.weight."""
  out = {}
  for name in lcfg.targets:
    path, _, _, stem = TARGETS[name]
    node = _get(lora, path)
    a, b = np.asarray(jax.device_get(node["a"]), np.float32), np.asarray(jax.device_get(node["b"]), np.float32)
    layers = range(config.num_layers) if path[0] == "layers" else [None]
    for i in layers:
      ai, bi = (a, b) if i is None else (a[i], b[i])
      key = _PEFT_PREFIX + (stem.format(i=i) if i is not None else stem)
      out[key + ".lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, lcfg.rank).T)
      out[key + ".lora_B.weight"] = np.ascontiguousarray(bi.reshape(lcfg.rank, -1).T)
  return out


def from_peft_state_dict(config: ModelConfig, lcfg: LoraConfig, tensors: dict[str, Any], mesh=None,
                         rules: ShardingRules = DEFAULT_RULES) -> Params:
  """The adapter tree from PEFT tensors; every expected key must be present with its exact shape."""
  specs = lora_specs(config, lcfg)
  # PEFT sometimes keeps the adapter name in the key ("lora_A.default.weight"); accept both.
  tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
  used, out = set(), {}
  for name in lcfg.targets:
    path, _, _, stem = TARGETS[name]
    spec = _get(specs, path)
    blocks = {"a": [], "b": []}
    layers = range(config.num_layers) if path[0] == "layers" else [None]
    for i in layers:
      key = _PEFT_PREFIX + (stem.format(i=i) if i is not None else stem)
      for part, suffix in (("a", ".lora_A.weight"), ("b", ".lora_B.weight")):
        if key + suffix not in tensors:
          raise LoraError(f"adapter has no tensor {key + suffix}")
        t = np.asarray(tensors[key + suffix], np.float32)
        one = spec[part].shape[1:] if i is not None else spec[part].shape  # our per-layer shape
        want = (lcfg.rank, math.prod(one[:-1])) if part == "a" else (math.prod(one[1:]), lcfg.rank)
        if t.shape != want:
          raise LoraError(f"adapter tensor {key + suffix} has shape {list(t.shape)}, expected {list(want)}")
        blocks[part].append(t.T.reshape(one))
        used.add(key + suffix)
    leaf = {p: np.stack(v) if path[0] == "layers" else v[0] for p, v in blocks.items()}
    out = _with(out, path, leaf)
  extra = sorted(set(tensors) - used)
  if extra:
    raise LoraError(f"adapter has tensor(s) for modules outside targets {list(lcfg.targets)}: {extra[:3]}")
  shardings = lora_shardings(config, lcfg, mesh, rules) if mesh is not None else None
  if shardings is None:
    return jax.tree.map(jnp.asarray, out)
  return jax.tree.map(lambda x, s: jax.device_put(x, s), out, shardings)


def save_adapter(path: str | os.PathLike, config: ModelConfig, lcfg: LoraConfig, lora: Params, *,
                 base_model_name_or_path: str | None = None) -> None:
  """Writes adapter_config.json + adapter_model.safetensors, loadable with `peft.PeftModel.from_pretrained`."""
  from safetensors.numpy import save_file  # noqa: PLC0415  (only adapter I/O needs it)
  folder = os.fspath(path)
  tensors = to_peft_state_dict(config, lcfg, lora)
  if jax.process_index() != 0:
    return
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank, "lora_alpha": lcfg.alpha,
      "lora_dropout": lcfg.dropout, "target_modules": list(lcfg.targets), "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None, "inference_mode": True,
      "init_lora_weights": True, "base_model_name_or_path": base_model_name_or_path,
  }
  with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
    json.dump(adapter_config, f, indent=2)


_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "lora_bias": False, "bias": "none", "fan_in_fan_out": False,
                "layers_to_transform": None, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, dict]:
  """(LoraConfig, the raw adapter_config.json) of a PEFT LoRA folder; LoraError when it is not one we load."""
  cfg_path = os.path.join(os.fspath(path), ADAPTER_CONFIG)
  try:
    with open(cfg_path) as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise LoraError(f"{cfg_path}: missing; not an adapter folder") from None
  if raw.get("peft_type") != "LORA":
    raise LoraError(f"{cfg_path}: peft_type is {raw.get('peft_type')!r}, only 'LORA' adapters load")
  for key, ok in _UNSUPPORTED.items():
    if raw.get(key, ok) not in (ok, None) and not (ok == {} and not raw.get(key)):
      raise LoraError(f"{cfg_path}: {key}={raw[key]!r} is not supported (expected {ok!r})")
  targets = raw.get("target_modules")
  if isinstance(targets, str) or not targets:
    raise LoraError(f"{cfg_path}: target_modules must be a list of names from {sorted(TARGETS)}, got {targets!r}")
  # PEFT matches a target by its dotted suffix ("attention.wqkv" names wqkv); r and lora_alpha default to 8 there.
  targets = tuple(str(t).rsplit(".", 1)[-1] for t in targets)
  lcfg = LoraConfig(rank=int(raw.get("r", 8)), alpha=float(raw.get("lora_alpha", 8)),
                    dropout=float(raw.get("lora_dropout", 0.0)), targets=targets)
  return lcfg, raw


def load_adapter(path: str | os.PathLike, config: ModelConfig, *, mesh=None,
                 rules: ShardingRules = DEFAULT_RULES) -> tuple[LoraConfig, Params]:
  """(LoraConfig, adapter tree) from a PEFT LoRA folder for an InternLM2 model (ours or PEFT's)."""
  from safetensors.numpy import load_file  # noqa: PLC0415
  folder = os.fspath(path)
  lcfg, _ = read_adapter_config(folder)
  weights = os.path.join(folder, ADAPTER_WEIGHTS)
  if not os.path.isfile(weights):
    raise LoraError(f"{weights}: missing (adapter_model.bin is not supported)")
  return lcfg, from_peft_state_dict(config, lcfg, load_file(weights), mesh=mesh, rules=rules)


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
