"""Every pretraining config loads and builds a valid ModelConfig without compiling anything (the accelerator
configs are otherwise only exercised on hardware CI does not have)."""
import importlib
import pathlib

import pytest

from internlm_jax.config import ATTENTION_IMPLS
from internlm_jax.train.loop import model_config_from

PRETRAIN = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("pretrain_*.py"))


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_config_builds_a_model_config(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  for key in ("steps", "batch_size", "seq_len", "seed", "checkpoint_every", "log_every", "eval_every", "mesh"):
    assert key in cfg, key
  model = model_config_from(cfg, cfg.data.get("vocab_size", 32000) or 32000)
  assert model.attention_impl in ATTENTION_IMPLS
  assert cfg.seq_len <= model.max_position_embeddings
  if cfg.model.get("loss_chunk_size"):
    assert cfg.seq_len % cfg.model.loss_chunk_size == 0


def test_gpu_configs_use_cudnn_attention():
  # Measured fastest on an H200 (BENCHMARKS.md, sixth session): the 1.8B step 0.448 s against 0.472 s (Pallas).
  for name in ("pretrain_internlm2_1_8b", "pretrain_1_8b_8gpu"):
    assert importlib.import_module(f"configs.{name}").get_config().model.attention_impl == "cudnn"
