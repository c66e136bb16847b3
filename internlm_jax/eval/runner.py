"""Runs an evaluation config against one backend and writes everything under a workdir:

  DIR/predictions/<model>/<dataset>.jsonl   every sample: prompt, prediction, extracted answer, verdict
  DIR/results/<model>/<dataset>.json        the dataset's score rows, version, model fingerprint, extras
  DIR/cache/<model>-<fingerprint>/<dataset>.jsonl   per-request results (resume after an interruption)
  DIR/summary.json, summary.md, summary.csv         the summary (summary.py)

An interrupted run resumes from the cache (only missing requests are computed). With `reuse`, a dataset whose
results file matches the current version and weights is not touched at all (no scoring, no sandbox runs).

Eval config (ml_collections): `datasets` maps a dataset name to its config (see tasks.py, templates.py,
datasets.py); top-level `batch_size`, `max_length` (0 = the model's), `workers` (sandbox processes).
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Mapping

from internlm_jax.eval import needle, summary, tasks
from internlm_jax.eval.cache import SampleCache


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _plain(cfg) -> dict:
  return summary._plain(cfg) if cfg is not None else {}


def _write_jsonl(path: str, records: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
  os.replace(tmp, path)  # a reader never sees half a file


def evaluate_dataset(backend, name: str, ds: Mapping[str, Any], *, cache: SampleCache, out_dir: str,
                     progress: bool = True, workers: int = 4) -> tuple[list[dict], list[dict], dict]:
  """(score rows, prediction records, extras) of one dataset, without writing results."""
  mode = ds.get("mode", "gen")
  if mode not in tasks.MODES:
    raise tasks.TaskError(f"dataset {name!r}: mode must be one of {tasks.MODES}, got {mode!r}")
  desc = f"{name} [{mode}]"
  if mode == "needle":
    return needle.run(backend, ds, cache, out_dir, progress=progress, desc=desc)
  samples, pool = tasks.load_samples(ds)
  if mode == "perplexity":
    return tasks.run_perplexity(backend, ds, samples, cache, progress=progress, desc=desc)
  if mode in ("ppl", "ll"):
    return tasks.run_choice(backend, ds, samples, pool, cache, mode=mode, progress=progress, desc=desc)
  return tasks.run_gen(backend, ds, samples, pool, cache, progress=progress, workers=workers, desc=desc)


def run(cfg, backend, workdir: str, *, reuse: bool = False, progress: bool = True, only: tuple[str, ...] = (),
        log: Callable[[str], None] = print) -> list[dict]:
  """Evaluates every dataset of `cfg` (or those named in `only`); returns this run's summary rows."""
  datasets = _plain(cfg.get("datasets"))
  if not datasets:
    raise tasks.TaskError("the eval config has no datasets")
  unknown = sorted(set(only) - set(datasets))
  if unknown:
    raise tasks.TaskError(f"--datasets names {unknown}, which the config lacks; it has {sorted(datasets)}")
  workers = int(cfg.get("workers", 4))
  model_dir = _safe(backend.name)
  rows: list[dict] = []
  for name, ds in datasets.items():
    if only and name not in only:
      continue
    version = summary.version(ds)
    result_path = os.path.join(workdir, "results", model_dir, f"{name}.json")
    if reuse and os.path.isfile(result_path):
      with open(result_path, encoding="utf-8") as f:
        previous = json.load(f)
      if previous.get("version") == version and previous.get("fingerprint") == backend.fingerprint:
        log(f"{name}: reusing {result_path}")
        rows += previous["rows"]
        continue
    start = time.time()
    cache = SampleCache(os.path.join(workdir, "cache", f"{model_dir}-{backend.fingerprint[:12]}", f"{name}.jsonl"))
    out_dir = os.path.join(workdir, "results", model_dir)
    task_rows, records, extra = evaluate_dataset(backend, name, ds, cache=cache, out_dir=out_dir,
                                                 progress=progress, workers=workers)
    full = [{"dataset": name, "version": version, "metric": r["metric"], "mode": r["mode"],
             "score": float(r["score"]), "model": backend.name} for r in task_rows]
    _write_jsonl(os.path.join(workdir, "predictions", model_dir, f"{name}.jsonl"), records)
    os.makedirs(out_dir, exist_ok=True)
    with open(result_path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"dataset": name, "version": version, "model": backend.name, "fingerprint": backend.fingerprint,
                 "config": ds, "num_samples": len(records), "seconds": round(time.time() - start, 2),
                 "rows": full, "extra": extra}, f, indent=2, default=str)
    os.replace(result_path + ".tmp", result_path)
    log(f"{name}: " + ", ".join(f"{r['metric']}={r['score']:.2f}" for r in full) +
        f" ({len(records)} samples, {time.time() - start:.1f}s)")
    rows += full
  paths = summary.write(workdir, rows)
  log("\n" + summary.text_table(summary.collect(os.path.join(workdir, "results")) or rows))
  log(f"summary: {paths['json']}  {paths['md']}  {paths['csv']}")
  return rows


def train_eval_hook(cfg, tokenizer, *, batch_size: int = 8) -> Callable[[Any, Any, int], dict[str, float]]:
  """For a training loop: `hook(params, model_config, step)` evaluates `cfg`'s datasets in-process (no cache,
  no files, no progress bars) and returns {"eval/<dataset>/<metric>": score} to log with the step's metrics."""
  from internlm_jax.eval.backends import InProcessBackend

  def hook(params, model_config, step: int) -> dict[str, float]:
    backend = InProcessBackend(params, model_config, tokenizer, name="train", batch_size=batch_size,
                               max_length=int(cfg.get("max_length", 0)) or None, fingerprint=f"step{step}")
    out = {}
    for name, ds in _plain(cfg.get("datasets")).items():
      task_rows, _, _ = evaluate_dataset(backend, name, ds, cache=SampleCache(None), out_dir="", progress=False,
                                         workers=int(cfg.get("workers", 2)))
      out.update({f"eval/{name}/{r['metric']}": float(r["score"]) for r in task_rows})
    return out

  return hook
