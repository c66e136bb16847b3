"""A params-only checkpoint folder: an orbax `StandardCheckpointer` save of the params plus the ModelConfig as JSON.

Layout of DIR:  model_config.json  (dataclasses.asdict(ModelConfig))
                params/            (orbax; restorable onto any mesh from the abstract params)

A stopgap until the training checkpoints (checkpoint.py) exist: it lets `experiments/convert.py` move weights
between HF folders and the orbax format that training and serving will read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.model import abstract_params
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TRAINING_CHECKPOINTS = "checkpoints"  # experiments/train.py's WORKDIR/checkpoints/<step>/state


def save_params_checkpoint(directory: str | os.PathLike, config: ModelConfig, params: dict[str, Any]) -> None:
  """Writes DIR/model_config.json and DIR/params (replacing an earlier params save there)."""
  directory = os.path.abspath(os.fspath(directory))  # orbax wants absolute paths
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the async write
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(config), f, indent=2)


def load_params_checkpoint(directory: str | os.PathLike, *, mesh=None,
                           rules: ShardingRules = DEFAULT_RULES) -> tuple[ModelConfig, dict[str, Any]]:
  """(config, params) from a folder written by `save_params_checkpoint` (or a training workdir, see
  `load_training_params`), restored straight into the shardings of `mesh` (one device without a mesh)."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.isdir(os.path.join(directory, TRAINING_CHECKPOINTS)):
    return load_training_params(directory, mesh=mesh, rules=rules)
  config = read_config(os.path.join(directory, CONFIG_FILE))
  return config, _restore_params(os.path.join(directory, PARAMS_DIR), config, mesh, rules)


def read_config(path: str) -> ModelConfig:
  try:
    with open(path) as f:
      fields = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{path}: missing; not a params checkpoint folder or training workdir") from None
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ConfigError(f"{path}: unknown ModelConfig field(s) {unknown}")
  return ModelConfig(**fields)


def _abstract_target(config, mesh, rules):
  target = abstract_params(config, mesh, rules)
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single), target)
  return target


def _restore_params(path, config, mesh, rules):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, _abstract_target(config, mesh, rules))


def training_steps(workdir: str | os.PathLike) -> list[int]:
  """Committed checkpoint steps of a training workdir, oldest first."""
  root = os.path.join(os.fspath(workdir), TRAINING_CHECKPOINTS)
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root)
                if d.isdigit() and os.path.exists(os.path.join(root, d, "commit_success.txt")))


def load_training_params(workdir: str | os.PathLike, *, step: int | None = None, mesh=None,
                         rules: ShardingRules = DEFAULT_RULES) -> tuple[ModelConfig, dict[str, Any]]:
  """(config, params) of a training workdir's newest (or given) checkpoint, reading only the params.

  The optimizer state stays on disk: a partial orbax restore of the TrainState's `params` subtree.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  config = read_config(os.path.join(workdir, CONFIG_FILE))
  steps = training_steps(workdir)
  if not steps:
    raise ConfigError(f"{workdir}: no committed checkpoint under {TRAINING_CHECKPOINTS}/")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"{workdir}: no checkpoint at step {step}; have {steps}")
  target = {"params": _abstract_target(config, mesh, rules)}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), target)
  path = os.path.join(workdir, TRAINING_CHECKPOINTS, str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                      partial_restore=True))
  return config, restored["params"]


def convert(*, from_hf: str | None = None, to: str | None = None, from_ckpt: str | None = None,
            to_hf: str | None = None, dtype: str | None = None, max_shard_bytes: int = 2**31, mesh=None,
            to_gguf: str | None = None, gguf_type: str = "f16") -> None:
  """HF -> params checkpoint (from_hf + to), params checkpoint / training workdir -> HF (from_ckpt + to_hf), or
  either source -> a llama.cpp GGUF file (to_gguf, gguf_type f32 / f16 / q8_0)."""
  from internlm_jax.hf_io import load_hf_checkpoint, save_hf_checkpoint  # noqa: PLC0415  (hf_io is heavier)
  from internlm_jax.sharding import make_mesh  # noqa: PLC0415
  if to_gguf:
    if bool(from_hf) == bool(from_ckpt) or to or to_hf:
      raise ValueError("--to_gguf=FILE takes one source: --from_hf=DIR or --from_ckpt=DIR")
    return _to_gguf(from_hf or from_ckpt, bool(from_hf), to_gguf, gguf_type)
  to_ckpt = bool(from_hf and to) and not (from_ckpt or to_hf)
  to_hf_dir = bool(from_ckpt and to_hf) and not (from_hf or to)
  if not (to_ckpt or to_hf_dir):
    raise ValueError("give exactly one direction: --from_hf=DIR --to=DIR, --from_ckpt=DIR --to_hf=DIR, or "
                     "--from_hf / --from_ckpt with --to_gguf=FILE")
  mesh = mesh if mesh is not None else make_mesh(fsdp=-1)
  if to_ckpt:
    config, params = load_hf_checkpoint(from_hf, mesh=mesh, dtype=dtype)
    save_params_checkpoint(to, config, params)
    copy_tokenizer_files(from_hf, to)
    logging.info("wrote params checkpoint %s (%d params, %s)", to, config.num_params(), config.param_dtype)
  else:
    config, params = load_params_checkpoint(from_ckpt, mesh=mesh)
    save_hf_checkpoint(to_hf, config, params, max_shard_bytes=max_shard_bytes, dtype=dtype)
    copy_tokenizer_files(from_ckpt, to_hf)
    logging.info("wrote HF folder %s (%d params)", to_hf, config.num_params())


def _to_gguf(source: str, is_hf: bool, path: str, file_type: str) -> None:
  """Writes `source`'s weights as a GGUF; the vocabulary comes from the source's tokenizer.model when present."""
  from internlm_jax.serve.gguf import FILE_TYPES, export_gguf  # noqa: PLC0415
  from internlm_jax.tokenizer import Tokenizer  # noqa: PLC0415
  if file_type not in FILE_TYPES:
    raise ValueError(f"--gguf_type must be one of {FILE_TYPES}, got {file_type!r}")
  if is_hf:
    from internlm_jax.hf_io import load_hf_checkpoint  # noqa: PLC0415
    config, params = load_hf_checkpoint(source)
  else:
    config, params = load_params_checkpoint(source)
  if config.rope_scaling_type == "dynamic":  # llama.cpp has no dynamic NTK: same logits up to the trained length
    logging.warning("dynamic NTK rope scaling is not in GGUF: llama.cpp matches this model only up to "
                    "max_position_embeddings=%d tokens", config.max_position_embeddings)
  model_file = os.path.join(source, "tokenizer.model")
  tokenizer = Tokenizer(model_file) if os.path.isfile(model_file) else None
  if tokenizer is None:
    logging.warning("%s has no tokenizer.model: the GGUF gets a placeholder vocabulary (token ids only)", source)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  export_gguf(config, params, path, file_type, tokenizer=tokenizer)
  logging.info("wrote GGUF %s (%s, %d params)", path, file_type, config.num_params())


# Carried along so the converted folder serves, evaluates and loads in transformers on its own: the released
# tokenizer.model names the chat pieces [UNUSED_TOKEN_14x]; tokenizer_config.json renames them <|im_start|>...,
# and config.json's auto_map needs the remote-code *.py files.
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.json", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src: str, dst: str) -> None:
  """Copies the tokenizer files and the remote-code *.py files of `src` into `dst`."""
  if jax.process_index() != 0:
    return
  names = list(_TOKENIZER_FILES) + sorted(f for f in os.listdir(src) if f.endswith(".py"))
  for name in names:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
