"""experiments/bench_guided.py runs end to end on a small batch and writes its ratios (slow: a 125M model)."""
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
