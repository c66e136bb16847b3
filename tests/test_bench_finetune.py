"""experiments/bench_finetune.py end to end on the tiny preset: every method measured in one run, and the JSON
keys the fine-tuning issue names. Slow: four methods' steps compile (about a minute on 2 cores)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_every_method_and_the_issue_keys(tmp_path):
  out = tmp_path / "ft.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  run = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_finetune.py"), "--preset=tiny",
                        "--seq_len=32", "--steps=1", "--rank=4", "--qlora_ranks=2", "--attention_block_size=16",
                        f"--out={out}"], capture_output=True, text=True, env=env, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  res = json.loads(out.read_text())
  for key in ("qlora_bytes_per_param", "lora_bytes_per_param", "full_bytes_per_param", "lora_step_vs_base"):
    assert isinstance(res[key], float) and res[key] > 0, key
  # Memory falls from full fine-tuning (weights, gradients and two AdamW moments) to LoRA to QLoRA.
  assert res["full_bytes_per_param"] > res["lora_bytes_per_param"] > res["qlora_bytes_per_param"]
