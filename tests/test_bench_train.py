"""experiments/bench_train.py end to end on a tiny preset: our step, then the torch peer in a second process that
takes our figures from the first one's JSON (how device_check.sh gives each the whole GPU)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--preset=tiny", "--seq_len=32", "--batch=2", "--steps=1", "--dtype=bfloat16", "--attention_impl=cudnn",
         "--scan_layers"]


def bench(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_train.py"), *FLAGS, *args],
                        capture_output=True, text=True, env=env, timeout=300)


# Runs the benchmark script twice end to end (21 s): with the slow suite, like the other benchmark scripts' runs.
@pytest.mark.slow
def test_ours_then_peer_from_json(tmp_path):
  pytest.importorskip("torch")
  ours_json, both_json = tmp_path / "ours.json", tmp_path / "both.json"
  first = bench("--torch=false", f"--out={ours_json}")
  assert first.returncode == 0, first.stderr[-2000:]
  ours = json.loads(ours_json.read_text())
  assert ours["dtype"] == "bfloat16" and ours["attention_impl"] == "cudnn" and ours["tokens_per_sec"] > 0
  assert ours["mfu"] == pytest.approx(ours["tokens_per_sec"] * ours["flops_per_token"] / ours["peak_flops"])
  assert "torch_tokens_per_sec" not in ours
  second = bench(f"--ours_json={ours_json}", f"--out={both_json}")
  assert second.returncode == 0, second.stderr[-2000:]
  both = json.loads(both_json.read_text())
  assert both["step_seconds"] == ours["step_seconds"] and both["peak_flops"] == ours["peak_flops"]
  assert both["speedup_vs_torch"] == pytest.approx(both["tokens_per_sec"] / both["torch_tokens_per_sec"])
  assert both["mfu"] == ours["mfu"]  # the four keys: mfu, tokens_per_sec, torch_*, speedup_vs_torch
  mismatched = bench(f"--ours_json={ours_json}", "--batch=4")
  assert mismatched.returncode != 0 and "rerun it with these flags" in mismatched.stderr
