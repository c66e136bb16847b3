"""The runner end to end with a scripted backend (no model): standard-format fixtures, every mode, the output
files, resuming after an interruption, --reuse, and the needle grid."""
import csv
import json
import os
import re

import pytest

from internlm_jax.eval import presets, runner
from internlm_jax.eval.testing import CharTokenizer, ScriptedBackend

QUIET = dict(progress=False, log=lambda *_: None)


def _jsonl(path, records):
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture()
def data(tmp_path):
  d = tmp_path / "data"
  d.mkdir()
  gsm = [{"question": f"What is {a} + {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
         for a, b in [(1, 2), (3, 4), (10, 20), (5, 5)]]
  math = [{"problem": "Half of one?", "solution": r"It is $\boxed{\frac{1}{2}}$."},
          {"problem": "Two squared?", "solution": r"So \boxed{4}."}]
  arc = [{"id": f"q{i}", "question": {"stem": f"Which is {w}?", "choices": [
      {"text": w, "label": "A"}, {"text": "rock", "label": "B"}, {"text": "sand", "label": "C"}]},
          "answerKey": "A"} for i, w in enumerate(["water", "fire", "air"])]
  os.makedirs(d / "mmlu" / "test")
  os.makedirs(d / "mmlu" / "dev")
  with open(d / "mmlu" / "test" / "astronomy_test.csv", "w") as f:
    f.write("What is the Sun?,star,planet,moon,comet,A\nWhat is Mars?,star,planet,moon,comet,B\n")
  with open(d / "mmlu" / "dev" / "astronomy_dev.csv", "w") as f:
    f.write("What is Luna?,star,planet,moon,comet,C\n")
  with open(d / "pairs.csv", "w") as f:
    f.write("src,tgt\nthe cat,le chat dort sur le tapis\nthe dog,le chien mange sa soupe\n")
  return {"gsm8k": _jsonl(d / "gsm.jsonl", gsm), "math": _jsonl(d / "math.jsonl", math),
          "arc": _jsonl(d / "arc.jsonl", arc), "mmlu": str(d / "mmlu"), "pairs": str(d / "pairs.csv")}


def _config(data):
  return presets.eval_config({
      "gsm8k": presets.gsm8k(path=data["gsm8k"], fewshot_path=data["gsm8k"], num_shots=2),
      "math": presets.math(path=data["math"], num_shots=0),
      "mmlu": presets.mmlu(path=data["mmlu"], num_shots=1),
      "mmlu_gen": presets.mmlu(path=data["mmlu"], num_shots=0, mode="gen"),
      "arc": presets.arc(path=data["arc"]),
      "translate": presets.generic(data["pairs"], "English: {src}\nFrench:", "tgt", ["src"], metric="bleu"),
      "translate_rouge": presets.generic(data["pairs"], "English: {src}\nFrench:", "tgt", ["src"], metric="rouge"),
  })


def _answer(prompt):
  """A scripted model that knows this test's answers (and gets the third GSM8K question wrong)."""
  if isinstance(prompt, list):
    prompt = prompt[-1]["content"]
  last = prompt.split("\n\n")[-1]
  if m := re.search(r"What is (\d+) \+ (\d+)\?", last):
    a, b = int(m.group(1)), int(m.group(2))
    return f" {a} + {b} = {a + b + (a == 10)}.\nThe answer is {a + b + (a == 10)}.\n\nQuestion: junk 99"
  if "Half of one" in last:
    return r" We get \boxed{0.5}."
  if "Two squared" in last:
    return r" \boxed{4.0}"
  if "English: the cat" in last:
    return " le chat dort sur le tapis\nmore"
  if "English: the dog" in last:
    return " le chien mange sa soupe"
  if "What is Mars" in last:
    return " The answer is (B)."
  return " A"


def _score(ctx, cont):
  """Log-likelihoods that prefer the right option: 'A' for ARC and the Sun, 'B' for Mars."""
  tok = CharTokenizer()
  ctx, cont = tok.decode(ctx), tok.decode(cont).strip()
  question = ctx.split("\n\n")[-1]
  right = "B" if "Mars" in question else "A"
  if "Which is" in question:
    right = re.search(r"Which is (\w+)\?", question).group(1)
  return -1.0 if cont == right else -5.0 - len(cont)


def _backend(**kw):
  return ScriptedBackend(_answer, _score, tokenizer=CharTokenizer(), name="scripted", **kw)


def test_every_mode_and_the_output_files(tmp_path, data):
  work = tmp_path / "work"
  rows = runner.run(_config(data), _backend(), str(work), **QUIET)
  scores = {(r["dataset"], r["metric"]): r["score"] for r in rows}
  assert scores[("gsm8k", "accuracy")] == pytest.approx(75.0)
  assert scores[("math", "accuracy")] == 100.0
  assert scores[("mmlu", "accuracy")] == 100.0 and scores[("mmlu_gen", "accuracy")] == 100.0
  assert scores[("arc", "accuracy")] == 100.0
  assert scores[("translate", "bleu")] == pytest.approx(100.0)
  assert scores[("translate_rouge", "rougeL")] == pytest.approx(100.0)
  with open(work / "summary.json") as f:
    summary = json.load(f)
  assert {tuple(sorted(r)) for r in summary} == {("dataset", "metric", "mode", "model", "score", "version")}
  assert {r["mode"] for r in summary if r["dataset"] == "mmlu"} == {"ppl"}
  assert {r["mode"] for r in summary if r["dataset"] == "arc"} == {"ll"}
  with open(work / "summary.csv") as f:
    table = list(csv.reader(f))
  assert table[0] == ["dataset", "version", "metric", "mode", "scripted"] and len(table) == 1 + len(summary)
  assert (work / "summary.md").read_text().startswith("| dataset | version | metric | mode | scripted |")
  with open(work / "predictions" / "scripted" / "gsm8k.jsonl") as f:
    preds = [json.loads(line) for line in f]
  assert [p["correct"] for p in preds] == [True, True, False, True]
  assert preds[0]["extracted"] == "3" and preds[0]["prompt"].count("Question:") == 3  # 2 shots + the question
  with open(work / "predictions" / "scripted" / "mmlu.jsonl") as f:
    first = json.loads(f.readline())
  assert first["prompt"].startswith("The following are multiple choice questions (with answers) about astronomy.")
  assert "What is Luna?" in first["prompt"] and set(first["option_scores"]) == set("ABCD")


def test_interrupted_run_resumes_without_recomputing(tmp_path, data):
  cfg = presets.eval_config({"gsm8k": presets.gsm8k(path=data["gsm8k"], num_shots=0)})
  cfg.datasets.gsm8k.chunk_size = 1  # cache after every sample
  interrupted = _backend(fail_after=2)
  with pytest.raises(KeyboardInterrupt):
    runner.run(cfg, interrupted, str(tmp_path), **QUIET)
  resumed = _backend()
  rows = runner.run(cfg, resumed, str(tmp_path), **QUIET)
  assert resumed.calls == 2 and rows[0]["score"] == pytest.approx(75.0)  # only the two missing samples
  again = _backend()
  runner.run(cfg, again, str(tmp_path), **QUIET)
  assert again.calls == 0  # everything cached; metrics recomputed from the cache
  reused = _backend()
  logs = []
  runner.run(cfg, reused, str(tmp_path), reuse=True, progress=False, log=logs.append)
  assert reused.calls == 0 and any("reusing" in line for line in logs)
  # A changed config is a new version: --reuse does not skip it, and changed prompts are not served from cache.
  cfg.datasets.gsm8k.template.prompt = "Q: {question}\nA:"
  changed = _backend()
  runner.run(cfg, changed, str(tmp_path), reuse=True, **QUIET)
  assert changed.calls == 4


def test_a_torn_cache_line_costs_only_its_own_sample(tmp_path):
  from internlm_jax.eval.cache import SampleCache
  path = str(tmp_path / "cache.jsonl")
  SampleCache(path).put_many({"a": 1})
  with open(path, "a") as f:
    f.write('{"key": "b", "val')  # killed mid-write
  SampleCache(path).put_many({"c": 3})
  assert {k: SampleCache(path).get(k) for k in ("a", "c")} == {"a": 1, "c": 3}


def test_report_reads_a_metrics_file_with_a_torn_last_line(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "report_script", os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "report.py"))
  report = importlib.util.module_from_spec(spec)
  from absl import flags
  before = set(flags.FLAGS)
  try:
    spec.loader.exec_module(report)
  finally:  # its flags go again: another test in this process may load a script defining --workdir too
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.5}\n\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')  # killed mid-write
  assert [r["step"] for r in report._read_jsonl(str(path))] == [1, 2]


def test_second_model_adds_a_column(tmp_path, data):
  cfg = presets.eval_config({"math": presets.math(path=data["math"], num_shots=0)})
  runner.run(cfg, _backend(), str(tmp_path), **QUIET)
  other = ScriptedBackend(lambda p: "no idea", name="other")
  runner.run(cfg, other, str(tmp_path), **QUIET)
  lines = (tmp_path / "summary.md").read_text().splitlines()
  assert lines[0] == "| dataset | version | metric | mode | scripted | other |"
  assert lines[2].endswith("| 100.00 | 0.00 |")
  with open(tmp_path / "summary.json") as f:
    assert [r["model"] for r in json.load(f)] == ["other"]  # this run's rows


def test_needle_grid_and_heatmap(tmp_path):
  def oracle(prompt):
    m = re.search(r"magic number hidden in this book is (\d+)", prompt)
    return f" {m.group(1)}." if m else " I do not know."

  cfg = presets.eval_config({"needle": presets.needle(lengths=(300, 600), depths=(0, 50, 100))})
  rows = runner.run(cfg, ScriptedBackend(oracle, tokenizer=CharTokenizer(), name="oracle"), str(tmp_path), **QUIET)
  assert rows[0]["metric"] == "retrieval" and rows[0]["score"] == 100.0
  with open(tmp_path / "predictions" / "oracle" / "needle.jsonl") as f:
    trials = [json.loads(line) for line in f]
  assert [(t["length"], t["depth"]) for t in trials] == [(n, d) for n in (300, 600) for d in (0.0, 50.0, 100.0)]
  png = tmp_path / "results" / "oracle" / "needle_heatmap.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  blind = ScriptedBackend(lambda p: " 1234", tokenizer=CharTokenizer(), name="blind")
  assert runner.run(cfg, blind, str(tmp_path), **QUIET)[0]["score"] == 0.0


def test_needle_placement():
  from internlm_jax.eval.needle import insert_needle
  context = "One. Two. Three. Four."
  assert insert_needle(context, "N.", 0).startswith("N. One.")
  assert insert_needle(context, "N.", 100).endswith("Four. N.")
  middle = insert_needle(context, "N.", 50)
  assert "Two. N. Three." in middle or "One. N. Two." in middle


def test_bad_configs_fail_with_one_line(tmp_path, data):
  cfg = presets.eval_config({"x": presets.gsm8k(path=data["gsm8k"])})
  cfg.datasets.x.mode = "magic"
  with pytest.raises(ValueError, match="mode must be one of"):
    runner.run(cfg, _backend(), str(tmp_path), **QUIET)
  with pytest.raises(ValueError, match=r"--datasets names \['nope'\]"):
    runner.run(cfg, _backend(), str(tmp_path), only=("nope",), **QUIET)
