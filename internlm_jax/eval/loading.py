"""Load (config, params, tokenizer) from any of our three checkpoint kinds, for the in-process backend.

- an HF folder (`config.json` + `*.safetensors`; `tokenizer.model` beside them),
- a params folder (`model_config.json` + `params/`, from `experiments/convert.py`),
- a training workdir (`checkpoints/<step>/state`): the TrainState holds no model config, so the training
  config file that produced it is needed (`train_config`), from which the model and tokenizer are rebuilt
  exactly as `train/loop.py` builds them.
"""
from __future__ import annotations

import importlib.util
import os

from internlm_jax.config import ModelConfig
from internlm_jax.tokenizer import Tokenizer


class LoadError(ValueError):
  """The checkpoint path is not one of the known kinds, or lacks what evaluation needs."""


def checkpoint_kind(path: str) -> str:
  if os.path.isfile(os.path.join(path, "config.json")) and any(
      n.endswith(".safetensors") for n in os.listdir(path)):
    return "hf"
  if os.path.isfile(os.path.join(path, "model_config.json")) and os.path.isdir(os.path.join(path, "params")):
    return "params"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "train"
  raise LoadError(f"{path}: not an HF folder (config.json + *.safetensors), a params folder (model_config.json + "
                  "params/) or a training workdir (checkpoints/)")


def load_config_file(path: str):
  """`get_config()` of an ml_collections config file."""
  if not os.path.isfile(path):
    raise LoadError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_cfg_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise LoadError(f"config file {path!r} has no get_config()")
  return module.get_config()


def _train_tokenizer_path(cfg) -> str:
  if cfg.data.tokenizer:
    return cfg.data.tokenizer
  if cfg.data.corpus == "shakespeare":
    from internlm_jax.data import corpus
    return corpus.shakespeare_tokenizer(cfg.data.vocab_size)
  raise LoadError("the training config names no tokenizer (config.data.tokenizer)")


def load_model(path: str, *, tokenizer: str = "", train_config: str = "", step: int | None = None
               ) -> tuple[ModelConfig, dict, Tokenizer, str]:
  """(model config, params, tokenizer, a description like "hf:/path" or "train:/path@240")."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise LoadError(f"--checkpoint {path!r} is not a folder")
  kind = checkpoint_kind(path)
  if kind == "hf":
    from internlm_jax.hf_io import load_hf_checkpoint
    config, params = load_hf_checkpoint(path)
    tok_path = tokenizer or path
    described = f"hf:{path}"
  elif kind == "params":
    from internlm_jax.params_io import load_params_checkpoint
    config, params = load_params_checkpoint(path)
    tok_path = tokenizer or path
    described = f"params:{path}"
  else:
    if not train_config:
      raise LoadError(f"{path} is a training workdir; pass --train_config=<the config file it was trained with>")
    from internlm_jax.checkpoint import CheckpointManager, abstract_train_state
    from internlm_jax.train.loop import model_config_from
    from internlm_jax.train.optimizer import OptimizerConfig, make_optimizer
    cfg = load_config_file(train_config)
    tok_path = tokenizer or _train_tokenizer_path(cfg)
    config = model_config_from(cfg, Tokenizer(tok_path).vocab_size)
    tx = make_optimizer(OptimizerConfig(total_steps=cfg.steps, **dict(cfg.optimizer)))
    with CheckpointManager(os.path.join(path, "checkpoints"), save_every=1, async_save=False) as manager:
      restored = manager.restore(abstract_train_state(config, tx), step)
    if restored is None:
      raise LoadError(f"{path}/checkpoints holds no checkpoint")
    state = restored[0]
    params = state.params
    described = f"train:{path}@{int(state.step)}"
  if os.path.isdir(tok_path) and not os.path.isfile(os.path.join(tok_path, "tokenizer.model")):
    raise LoadError(f"{tok_path} has no tokenizer.model; pass --tokenizer=PATH")
  return config, params, Tokenizer(tok_path), described
