"""experiments/evaluate.py on real (tiny) checkpoints, and the same evaluation through the HTTP backend."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.eval import loading, runner
from internlm_jax.eval.backends import InProcessBackend
from internlm_jax.eval.openai_backend import OpenAIBackend
from internlm_jax.eval.testing import fake_openai_server, tiny_backend
from internlm_jax.params_io import save_params_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EVAL_CONFIG = """
from internlm_jax.eval import presets


def get_config():
  return presets.eval_config({{
      "shakespeare": presets.shakespeare_ppl(limit=2, max_chars=400),
      "qa": presets.generic({qa!r}, "Question: {{question}}\\nAnswer:", "answer", ["question"], max_tokens=6),
      "mmlu": presets.mmlu({mmlu!r}, num_shots=1),
      "needle": presets.needle(lengths=(96, 160), depths=(0, 100)),
  }}, batch_size=4, workers=2)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  backend = tiny_backend(str(root))
  backend.name = "ckpt"
  ckpt = root / "ckpt"
  save_params_checkpoint(str(ckpt), backend.config, backend.params)
  shutil.copy(backend.tokenizer.path, ckpt / "tokenizer.model")
  with open(root / "qa.jsonl", "w") as f:
    f.write(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n")
    f.write(json.dumps({"question": "What light?", "answer": "the east"}) + "\n")
  for split in ("test", "dev"):
    os.makedirs(root / "mmlu" / split)
    with open(root / "mmlu" / split / f"colors_{split}.csv", "w") as f:
      f.write("Which is red?,fire,grass,sky,snow,A\nWhich is green?,fire,grass,sky,snow,B\n")
  config_path = root / "eval_cfg.py"
  config_path.write_text(EVAL_CONFIG.format(qa=str(root / "qa.jsonl"), mmlu=str(root / "mmlu")))
  return root, backend, ckpt, config_path


def _scores(path):
  with open(path) as f:
    return {(r["dataset"], r["metric"]): r["score"] for r in json.load(f)}


# The CLI end to end, three ways (22 s): with the slow suite; the fast one keeps its unit tests.
@pytest.mark.slow
def test_cli_on_a_params_checkpoint_matches_the_library_and_the_api(setup):
  root, backend, ckpt, config_path = setup
  work = root / "work_cli"
  cmd = [sys.executable, "experiments/evaluate.py", f"--config={config_path}", f"--workdir={work}",
         f"--checkpoint={ckpt}", "--noprogress", "--config.datasets.shakespeare.limit=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dataset" in proc.stdout and "bits_per_byte" in proc.stdout
  cli = _scores(work / "summary.json")
  assert set(cli) == {("shakespeare", "perplexity"), ("shakespeare", "bits_per_byte"), ("qa", "accuracy"),
                      ("mmlu", "accuracy"), ("needle", "retrieval")}
  assert (work / "results" / "ckpt" / "needle_heatmap.png").exists()

  spec = loading.load_config_file(str(config_path))
  spec.datasets.shakespeare.limit = 1
  local = runner.run(spec, backend, str(root / "work_lib"), progress=False, log=lambda *_: None)
  assert {(r["dataset"], r["metric"]): r["score"] for r in local} == pytest.approx(cli, rel=1e-6)
  with fake_openai_server(backend, model="ckpt") as url:
    remote = OpenAIBackend(url, "ckpt", tokenizer=backend.tokenizer, batch_size=4, name="ckpt")
    api = runner.run(spec, remote, str(root / "work_api"), progress=False, log=lambda *_: None)
  assert {(r["dataset"], r["metric"]): r["score"] for r in api} == pytest.approx(cli, rel=1e-6)


def test_cli_errors_are_one_line(setup):
  root, _, ckpt, config_path = setup
  base = [sys.executable, "experiments/evaluate.py", f"--config={config_path}", f"--workdir={root / 'w'}"]
  proc = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0 and "exactly one of --checkpoint=DIR or --api_base=URL" in proc.stderr
  proc = subprocess.run(base + [f"--checkpoint={root}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0 and "not an HF folder" in proc.stderr.strip().splitlines()[-1]


def test_training_workdir_loads_with_its_config(setup, tmp_path):
  from internlm_jax.checkpoint import CheckpointManager
  from internlm_jax.train.optimizer import OptimizerConfig, make_optimizer
  from internlm_jax.train.loop import model_config_from
  from internlm_jax.train.state import create_train_state
  root, backend, _, _ = setup
  train_cfg = tmp_path / "train_cfg.py"
  train_cfg.write_text(f"import sys\nsys.path.insert(0, {REPO!r})\n"
                       "from configs.pretrain_tiny import get_config as base\n\n\ndef get_config():\n"
                       f"  c = base()\n  c.model.preset = 'tiny'\n  c.data.tokenizer = {backend.tokenizer.path!r}\n"
                       "  return c\n")
  cfg = loading.load_config_file(str(train_cfg))
  config = model_config_from(cfg, backend.tokenizer.vocab_size)
  tx = make_optimizer(OptimizerConfig(total_steps=cfg.steps, **dict(cfg.optimizer)))
  state = dataclasses.replace(create_train_state(config, tx, seed=3), step=jnp.asarray(7, jnp.int32))
  with CheckpointManager(str(tmp_path / "run" / "checkpoints"), save_every=1, async_save=False) as manager:
    manager.save(7, state, force=True)
  with pytest.raises(loading.LoadError, match="pass --train_config"):
    loading.load_model(str(tmp_path / "run"))
  loaded_config, params, tokenizer, described = loading.load_model(str(tmp_path / "run"),
                                                                    train_config=str(train_cfg))
  assert described.endswith("@7") and loaded_config == config
  assert tokenizer.vocab_size == backend.tokenizer.vocab_size
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  InProcessBackend(params, loaded_config, tokenizer, batch_size=2)  # usable as a backend
