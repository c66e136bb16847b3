"""experiments/bench_guided.py and bench_multi_lora.py run end to end on a small batch and write their ratios
(slow: a 125M model)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_guided_writes_its_ratios(tmp_path):
  out = tmp_path / "g.json"
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_guided.py"), "--slots=2",
                  "--new_tokens=4", "--repeats=1", f"--out={out}"], check=True, timeout=900,
                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
  res = json.loads(out.read_text())
  for name in ("none", "one", "all"):
    assert res[name]["tokens"] == 2 * 4 and res[name]["tokens_per_sec"] > 0
  assert res["one_guided_vs_none"] > 0 and res["all_guided_vs_none"] > 0


@pytest.mark.slow
def test_bench_multi_lora_writes_its_ratios(tmp_path):
  out = tmp_path / "m.json"
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_multi_lora.py"), "--slots=2",
                  "--new_tokens=4", "--repeats=1", "--adapters=2", "--rank=4", f"--out={out}"], check=True,
                 timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
  res = json.loads(out.read_text())
  for name in ("base_engine", "adapters_held_base_requests", "adapters_spread"):
    assert res[name]["tokens_per_sec"] > 0 and res[f"{name}_vs_base"] > 0
