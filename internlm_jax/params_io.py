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
from typing import Any

import jax
import orbax.checkpoint as ocp

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.model import abstract_params
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


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
  """(config, params) from a folder written by `save_params_checkpoint`, restored straight into the shardings
  of `mesh` (one device without a mesh)."""
  directory = os.path.abspath(os.fspath(directory))
  config_path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(config_path) as f:
      fields = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{config_path}: missing; not a params checkpoint folder") from None
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ConfigError(f"{config_path}: unknown ModelConfig field(s) {unknown}")
  config = ModelConfig(**fields)
  target = abstract_params(config, mesh, rules)
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single), target)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), target)
  return config, params
