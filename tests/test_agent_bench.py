"""The tool-use benchmark: scoring, the runner with the scripted oracle for every agent, a model that never uses
tools, and the command line (a scripted task with --output, and --bench)."""
import json
import os
import subprocess
import sys

import pytest

from internlm_jax.agent import AGENTS, ScriptedLLM
from internlm_jax.agent.bench import TASKS, format_report, oracle_llm, run_benchmark, score_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("answer, expected, ok", [
    ("The answer is 7,006,743.", "7006743", True), ("26.80", "26.8", True), ("about 27", "26.8", False),
    ("'Mar'", "Mar", True), ("march", "Mar", True), ("Feb", "Mar", False), (None, "1", False),
    ("1871 or 1923? I say 1923", "1871", False), ("-3", "-3", True)])
def test_score_answer(answer, expected, ok):
  assert score_answer(answer, expected) is ok


@pytest.mark.parametrize("kind", sorted(AGENTS))
def test_oracle_scores_perfectly_through_real_tools(kind):
  report = run_benchmark(lambda tools: AGENTS[kind](oracle_llm(kind), tools))
  assert report["tasks"] == len(TASKS) == 9
  assert report["accuracy"] == 1.0 and report["tool_use_rate"] == 1.0 and report["valid_call_rate"] == 1.0
  assert set(report["by_category"]) == {"arithmetic", "data", "retrieval"}
  assert "accuracy 1.00" in format_report(report)


def test_a_model_without_tools_scores_zero():
  report = run_benchmark(lambda tools: AGENTS["react"](ScriptedLLM(lambda m, t: "Final Answer: no idea"), tools),
                         tasks=TASKS[:3])
  assert report["accuracy"] == 0.0 and report["tool_use_rate"] == 0.0 and report["valid_call_rate"] == 0.0


def run_cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "agent.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=240)


def test_cli_scripted_task_writes_output(tmp_path):
  replies = tmp_path / "replies.json"
  replies.write_text(json.dumps([
      'Thought: multiply\nAction: calculator\nAction Input: {"expression": "12 * 34"}',
      'Thought: check in python\nAction: python\nAction Input: {"code": "408 + 1"}',
      "Thought: done\nFinal Answer: 409"]))
  out = tmp_path / "out.json"
  proc = run_cli("--agent=react", "--tools=python,calculator", "--task=What is 12*34+1?",
                 f"--scripted={replies}", f"--output={out}", f"--workdir={tmp_path / 'work'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "action: calculator" in proc.stdout and "final answer: 409" in proc.stdout
  result = json.loads(out.read_text())
  assert result["final_answer"] == "409" and result["status"] == "finished"
  assert [s["kind"] for s in result["steps"]].count("observation") == 2

  proc = run_cli("--agent=internlm2", "--bench", "--scripted=oracle", "--quiet", f"--output={tmp_path / 'b.json'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "accuracy 1.00" in proc.stdout and json.loads((tmp_path / "b.json").read_text())["accuracy"] == 1.0
  proc = run_cli("--task=x")
  assert proc.returncode != 0 and "exactly one model source" in proc.stderr


def test_cli_setup_errors_are_one_line(tmp_path):
  (tmp_path / "replies.json").write_text('["Final Answer: 1",')  # a truncated file
  proc = run_cli("--task=x", f"--scripted={tmp_path / 'replies.json'}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --scripted={tmp_path / 'replies.json'} is not "
                                                         "valid JSON")
