"""llama.cpp runs what `experiments/convert.py --to_gguf` writes, and decodes the same greedy tokens as our engine.

Slow: llama-cpp-python is not among the test requirements (it compiles llama.cpp, ~4 minutes), so where it is
missing this test builds it first, the way bench_serve's peer is installed.
"""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [1, 17, 250, 3, 99, 512, 7, 300]
NEW = 24


def _llama_cpp():
  try:
    return importlib.import_module("llama_cpp")
  except ImportError:
    pass
  out = subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python>=0.3"], capture_output=True,
                       text=True, timeout=1200)
  if out.returncode != 0:  # no registry or no compiler: say so rather than fail the suite on the environment
    pytest.skip(f"llama-cpp-python could not be installed: {out.stderr.strip().splitlines()[-1:]}")
  importlib.invalidate_caches()
  return importlib.import_module("llama_cpp")


def _llamacpp_greedy(path):
  """Greedy tokens and the prompt's next-token logits from llama.cpp, in a child process with its extra buffer
  types off (bench_peers: an AMX build of llama-cpp-python 0.3.36 segfaulted on the q8_0 file with them on, and
  took the test worker with it; the f32 numbers do not change). A crash of the child is a failed test."""
  from internlm_jax.serve.bench_peers import _llamacpp_child
  run = _llamacpp_child(str(path), PROMPT, NEW, threads=2, extra_bufts=False)
  return run["tokens"], np.asarray(run["first"])


def test_llamacpp_decodes_our_gguf_export_like_our_engine(tmp_path):
  _llama_cpp()  # installed (or the test skips)
  from internlm_jax.params_io import save_params_checkpoint
  from internlm_jax.serve.testing import greedy_run, tiny_model
  config, params = tiny_model(seed=3)
  save_params_checkpoint(tmp_path / "ckpt", config, params)
  for file_type in ("f32", "q8_0"):  # the command line users run
    subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "convert.py"), f"--from_ckpt={tmp_path / 'ckpt'}",
                    f"--to_gguf={tmp_path / file_type}.gguf", f"--gguf_type={file_type}"], check=True,
                   capture_output=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  engine, prefix, ours, _ = greedy_run(params, config, PROMPT, NEW)
  ours_first = np.asarray(prefix.logits)
  theirs, first = _llamacpp_greedy(tmp_path / "f32.gguf")
  spread = ours_first.max() - ours_first.min()
  assert np.abs(first[:config.vocab_size] - ours_first).max() < 1e-4 * spread
  assert theirs == ours
  # q8_0 (32-weight blocks) against our float32: the logits move by well under a percent of their spread.
  _, first_q8 = _llamacpp_greedy(tmp_path / "q8_0.gguf")
  assert np.abs(first_q8[:config.vocab_size] - ours_first).max() < 0.02 * spread
