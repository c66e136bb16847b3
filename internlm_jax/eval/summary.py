"""The summary: `DIR/summary.json` (a list of {dataset, version, metric, mode, score, model}) and the table
`dataset | version | metric | mode | <model>...` printed and written as `summary.md` and `summary.csv`.

`version` is a short hash of the dataset's config (as OpenCompass's config hash): two numbers in one row were
produced by the same prompts, shots, generation settings and metric. The table holds every model that has
results under DIR/results/, so evaluating a second checkpoint into the same DIR adds a column.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from typing import Any, Mapping, Sequence

COLUMNS = ("dataset", "version", "metric", "mode")


def _plain(value: Any) -> Any:
  """ConfigDicts and tuples as plain JSON values, for hashing and for results files."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def version(dataset_config: Mapping[str, Any]) -> str:
  """6 hex digits of the config's hash; fields that do not change any number (`limit` does) are included too,
  so the version names exactly what ran."""
  data = json.dumps(_plain(dataset_config), sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(data.encode()).hexdigest()[:6]


def _fmt(score: float | None) -> str:
  return "-" if score is None else f"{score:.2f}"


def table_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """(header, body) with one score column per model, rows in first-seen order."""
  models: list[str] = []
  keyed: dict[tuple, dict[str, float]] = {}
  for r in rows:
    if r["model"] not in models:
      models.append(r["model"])
    keyed.setdefault(tuple(r[c] for c in COLUMNS), {})[r["model"]] = r["score"]
  header = list(COLUMNS) + models
  body = [list(key) + [_fmt(scores.get(m)) for m in models] for key, scores in keyed.items()]
  return header, body


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  header, body = table_rows(rows)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in body]
  return "\n".join(lines) + "\n"


def text_table(rows: Sequence[Mapping[str, Any]]) -> str:
  header, body = table_rows(rows)
  widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body]) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
  header, body = table_rows(rows)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(body)
  return out.getvalue()


def collect(results_dir: str) -> list[dict]:
  """Score rows of every model's results files (DIR/results/<model>/<dataset>.json)."""
  rows: list[dict] = []
  if not os.path.isdir(results_dir):
    return rows
  folders = {}
  for model in os.listdir(results_dir):
    folder = os.path.join(results_dir, model)
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".json")) \
        if os.path.isdir(folder) else []
    if files:
      folders[model] = files
  # Models in the order they were first evaluated: the table's columns stay put as models are added.
  for model in sorted(folders, key=lambda m: (min(os.path.getmtime(p) for p in folders[m]), m)):
    for path in folders[model]:
      with open(path, encoding="utf-8") as f:
        rows += json.load(f)["rows"]
  return rows


def write(workdir: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Writes summary.json (this run's rows) and the table of every model's rows; returns the paths."""
  os.makedirs(workdir, exist_ok=True)
  paths = {k: os.path.join(workdir, f"summary.{k}") for k in ("json", "md", "csv")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump([dict(r) for r in rows], f, indent=2, ensure_ascii=False)
  everything = collect(os.path.join(workdir, "results")) or list(rows)
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(markdown(everything))
  with open(paths["csv"], "w", encoding="utf-8") as f:
    f.write(csv_text(everything))
  return paths
