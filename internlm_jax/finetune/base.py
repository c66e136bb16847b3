"""The model a fine-tune starts from: an HF folder, a params folder (params_io) or a pretraining workdir.

    config, params, tokenizer_path = load_base("/runs/tiny", mesh=mesh)

Kinds, told apart by what the folder holds:
  HF folder        config.json + *.safetensors (hf_io); the tokenizer is FOLDER/tokenizer.model when present.
  params folder    model_config.json + params/ (params_io).
  training run     checkpoints/<step>/state (a workdir of experiments/train.py, or its checkpoints/ folder).
                   Only the params are read (an orbax partial restore: the optimizer moments stay on disk). The
                   run records no ModelConfig, so the shape fields (vocab, hidden, layers, heads, kv heads,
                   head_dim, mlp) are read off the saved arrays and the rest (rope theta, norm eps, max positions)
                   come from `preset` plus `overrides`; the run records no tokenizer either, so with none given
                   the cached Shakespeare tokenizer of the checkpoint's vocabulary size is used (what
                   configs/pretrain_tiny.py trains with) and its size is checked against the embedding.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from internlm_jax.config import ConfigError, ModelConfig, get_preset
from internlm_jax.hf_io import load_hf_checkpoint
from internlm_jax.model import abstract_params
from internlm_jax.params_io import CONFIG_FILE, load_params_checkpoint
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules

Params = dict[str, Any]


def _step_dirs(folder: str) -> list[int]:
  if not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit() and os.path.isdir(os.path.join(folder, d, "state")))


def base_kind(path: str) -> str:
  """"hf", "params" or "run"; ConfigError naming what was expected otherwise."""
  if not path:
    raise ConfigError("config.base.checkpoint is empty: name an HF folder, a params folder or a pretraining workdir")
  if not os.path.isdir(path):
    raise ConfigError(f"config.base.checkpoint={path!r}: no such folder")
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return "params"
  if _step_dirs(os.path.join(path, "checkpoints")) or _step_dirs(path):
    return "run"
  raise ConfigError(f"config.base.checkpoint={path!r} is not an HF folder (config.json), a params folder "
                    f"({CONFIG_FILE}) or a training workdir with checkpoints/<step>/state")


def _run_state_dir(path: str, step: int | None) -> str:
  folder = os.path.join(path, "checkpoints") if _step_dirs(os.path.join(path, "checkpoints")) else path
  steps = _step_dirs(folder)
  chosen = steps[-1] if step is None or step < 0 else step
  if chosen not in steps:
    raise ConfigError(f"config.base.step={step}: {folder} has checkpoints for steps {steps}")
  return os.path.join(folder, str(chosen), "state")


def _shape(meta, *keys):
  for k in keys:
    meta = meta[k]
  return tuple(meta.shape)


def config_from_run(state_dir: str, preset: str, overrides: dict | None = None) -> ModelConfig:
  """The ModelConfig of a saved TrainState: shapes from the checkpoint metadata, the rest from `preset`."""
  meta = ocp.PyTreeCheckpointer().metadata(state_dir)
  meta = getattr(meta, "item_metadata", meta)  # newer orbax wraps the tree in a StepMetadata
  try:
    params = meta["params"]
    vocab, hidden = _shape(params, "embed")
    layers, _, kv, g2, head_dim = _shape(params, "layers", "wqkv")
    mlp = _shape(params, "layers", "w1")[-1]
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{state_dir}: not an InternLM2 TrainState checkpoint ({type(e).__name__}: {e})") from None
  shapes = dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_kv_heads=kv,
                num_heads=kv * (g2 - 2), head_dim=head_dim, intermediate_size=mlp)
  return get_preset(preset).replace(**shapes, **dict(overrides or {}))


def restore_run_params(state_dir: str, config: ModelConfig, mesh=None,
                       rules: ShardingRules = DEFAULT_RULES) -> Params:
  """Only the params of a saved TrainState, straight into the shardings of `mesh` (one device without one)."""
  target = abstract_params(config, mesh, rules)
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single), target)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  args = ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": restore_args},
                                partial_restore=True)
  try:
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=args)
  except Exception as e:  # noqa: BLE001  (orbax raises many types for a mismatched or damaged checkpoint)
    raise ConfigError(f"{state_dir}: cannot restore the params ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
  return restored["params"]


def load_base(path: str, *, mesh=None, rules: ShardingRules = DEFAULT_RULES, preset: str = "small",
              overrides: dict | None = None, step: int | None = None
              ) -> tuple[ModelConfig, Params, str | None]:
  """(config, params, tokenizer path or None) of the base model; see the module doc."""
  kind = base_kind(path)
  if kind == "hf":
    config, params = load_hf_checkpoint(path, mesh=mesh, rules=rules)
    tok = os.path.join(path, "tokenizer.model")
    return config, params, tok if os.path.isfile(tok) else None
  if kind == "params":
    config, params = load_params_checkpoint(path, mesh=mesh, rules=rules)
    tok = os.path.join(path, "tokenizer.model")
    return config, params, tok if os.path.isfile(tok) else None
  state_dir = _run_state_dir(path, step)
  config = config_from_run(state_dir, preset, overrides)
  return config, restore_run_params(state_dir, config, mesh, rules), None


def default_tokenizer(vocab_size: int) -> str:
  """The cached Shakespeare tokenizer of this size (what pretrain_tiny trains with); checked by the caller."""
  from internlm_jax.data import corpus  # noqa: PLC0415  (needs the corpus package only on this path)
  return corpus.shakespeare_tokenizer(vocab_size)
