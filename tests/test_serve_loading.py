"""What experiments/serve.py and chat.py build before serving: the KV page pool sized from a memory budget, the
default stop tokens, and a model loaded from an HF folder or a training workdir (with its tokenizer)."""
import dataclasses
import json
import shutil
import types

import jax
import numpy as np
import pytest

from internlm_jax.serve import loading
from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.kv_cache import RequestTooLargeError, bytes_per_page, pages_for_budget
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.scheduler import Scheduler
from internlm_jax.serve.testing import tiny_model, tiny_tokenizer

EC = EngineConfig(max_slots=2, max_seq_len=64, page_size=8)


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_page_pool_sized_from_a_memory_budget(model, monkeypatch):
  config, params = model
  per_page = bytes_per_page(config, 8)
  # int8 pages: 1 byte per element plus a float32 scale per token and head, so about 4x as many fit.
  assert bytes_per_page(config, 8, "int8") == 2 * config.num_layers * 8 * config.num_kv_heads * (config.head_dim + 4)
  assert pages_for_budget(config, 5 * per_page + per_page - 1, 8) == 5
  with pytest.raises(RequestTooLargeError, match="at least 2"):
    pages_for_budget(config, per_page, 8)
  engine = Engine(params, config, dataclasses.replace(EC, kv_budget_bytes=5 * per_page))
  assert engine.allocator.num_pages == 5 and engine.allocator.usable_pages == 4
  assert engine.max_request_tokens == 4 * 8  # the pool, not the context, bounds a request now
  # serve.py: a share of the device's free memory; CPU devices report none, so the host's available memory.
  real_cpu = loading.jax.local_devices()[0]
  if real_cpu.platform == "cpu" and loading.host_available_bytes() is not None:
    assert 0 < loading.kv_budget_bytes(0.5, tensor=1) <= loading.host_available_bytes() // 2 + 2**30
  device = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": 1000, "bytes_in_use": 200})
  monkeypatch.setattr(loading.jax, "local_devices", lambda: [device])
  assert loading.kv_budget_bytes(0.5, tensor=2) == 800
  cpu = types.SimpleNamespace(memory_stats=lambda: None, platform="cpu")
  monkeypatch.setattr(loading.jax, "local_devices", lambda: [cpu])
  monkeypatch.setattr(loading, "host_available_bytes", lambda: 10_000)
  assert loading.kv_budget_bytes(0.8, tensor=2) == 8_000  # one host: not multiplied by the tensor axis
  monkeypatch.setattr(loading, "kv_budget_bytes", lambda fraction, tensor: 3 * per_page)
  assert loading.build_engine(config, params, EC).allocator.num_pages == 3


def test_im_end_and_eos_stop_by_default(model, tok):
  config, params = model
  sched = Scheduler(Engine(params, config, EC), tok)  # not started: only its defaults are looked at
  im_end = tok.special_ids["<|im_end|>"]
  assert sched.default_stop_ids == (tok.eos_id, im_end)
  assert SamplingParams(stop_token_ids=(100,)).stop_ids(sched.default_stop_ids) == (tok.eos_id, im_end, 100)
  assert SamplingParams(ignore_eos=True).stop_ids(sched.default_stop_ids) == ()


def test_serve_loads_an_hf_folder_and_a_training_workdir(model, tok, tmp_path):
  from internlm_jax import hf_io
  from internlm_jax.checkpoint import CheckpointManager
  from internlm_jax.train.state import TrainState
  config, params = model
  hf_io.save_hf_checkpoint(tmp_path / "hf", config, params)
  # A training workdir as experiments/train.py leaves it: model_config.json, tokenizer.model, checkpoints/<step>.
  # (No optimizer state: serving restores only the params subtree, and building one would cost a compile.)
  doubled = jax.tree.map(lambda x: x * 2, params)  # not the HF folder's weights: each load reads its own
  state = TrainState(step=np.int32(3), params=doubled, opt_state={}, rng=np.zeros(2, np.uint32), skipped=np.int32(0))
  with CheckpointManager(str(tmp_path / "run" / "checkpoints"), save_every=1, async_save=False) as manager:
    manager.save(3, state, force=True)
  with open(tmp_path / "run" / "model_config.json", "w") as f:
    json.dump(dataclasses.asdict(config), f)
  for folder in ("hf", "run"):
    shutil.copyfile(tok.path, tmp_path / folder / "tokenizer.model")
  for folder, want in (("hf", params), ("run", state.params)):
    directory = str(tmp_path / folder)
    assert loading.find_tokenizer(directory, None).vocab_size == tok.vocab_size
    loaded_config, loaded = loading.load_model(directory)
    assert loaded_config.num_layers == config.num_layers and loaded_config.vocab_size == config.vocab_size
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6)
  with pytest.raises(FileNotFoundError, match="neither an HF InternLM2 folder"):
    loading.load_model(str(tmp_path))
