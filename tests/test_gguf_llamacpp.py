"""llama.cpp runs what `experiments/convert.py --to_gguf` writes, and decodes the same greedy tokens as our engine.

Slow: llama-cpp-python is not among the test requirements (it compiles llama.cpp, ~4 minutes), so where it is
missing this test builds it first, the way bench_serve's peer is installed.
"""
import importlib
import json
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


# llama.cpp runs in a child process, with its extra buffer types off (no weight repacking). Here llama-cpp-python
# 0.3.36, built with AVX-512 and AMX, died with a segfault in llama_decode on the q8_0 file for any batch over one
# token (the prompt), and took the test worker with it; with use_extra_bufts=False it decodes that file, and the
# f32 numbers do not change. A child also turns any crash of the peer into a failed test with its exit code.
_GREEDY = """
import json, sys
import llama_cpp
import numpy as np
default_params = llama_cpp.llama_cpp.llama_model_default_params
def model_params():
  params = default_params()
  params.use_extra_bufts = False
  return params
llama_cpp.llama_cpp.llama_model_default_params = model_params
path, prompt, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=len(prompt), n_threads=2, logits_all=True, verbose=False)
llm.eval(prompt)
first = np.array(llm.scores[llm.n_tokens - 1]).tolist()
tokens = []
for _ in range(new):
  tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
  llm.eval([tokens[-1]])
llm.close()
print(json.dumps({"tokens": tokens, "first": first}))
"""


def _llamacpp_greedy(path):
  out = subprocess.run([sys.executable, "-c", _GREEDY, str(path), json.dumps(PROMPT), str(NEW)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, f"llama.cpp exited with {out.returncode}: {out.stderr[-2000:]}"
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return result["tokens"], np.asarray(result["first"])


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
