"""Fine-tuning data from a config: packed SFT rows or DPO pair rows, held-out rows and held-out records.

config.data.source:
  "shakespeare"  the built-in instruction tasks (data.shakespeare_tasks); DPO pairs are made from them
                 (gold answer chosen, a wrong one rejected).
  "files"        comma-separated .jsonl / .json files: SFT records in any data.sft format (alpaca, messages,
                 conversation) or, for method "dpo", preference records {"prompt", "chosen", "rejected"}.
                 data.eval_paths (optional) are held out the same way; eval records that carry "options" and
                 "answer" (the multiple-choice format of shakespeare_tasks) are also scored for accuracy.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging

from internlm_jax.config import ConfigError
from internlm_jax.data import sft
from internlm_jax.data import shakespeare_tasks as tasks_lib


@dataclasses.dataclass
class FinetuneData:
  train_rows: dict          # SFT rows {field: [N, T]} or DPO rows {"chosen": rows, "rejected": rows}
  eval_rows: dict | None    # SFT rows of the held-out records (None for DPO or without held-out data)
  heldout: list[dict]       # held-out records; those with "options" are scored for accuracy
  summary: sft.SFTSummary
  eval_summary: sft.SFTSummary | None


def split_list(value) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in (value or ())]


def _records(paths: list[str]) -> list[Any]:
  out = []
  for path in paths:
    try:
      out += sft.load_records(path)
    except FileNotFoundError:
      raise ConfigError(f"data file {path!r} does not exist") from None
  return out


def records_from_config(cfg) -> tuple[list[Any], list[Any]]:
  """(train records, held-out records) before tokenization."""
  data = cfg.data
  if data.source == "shakespeare":
    s = data.shakespeare
    return tasks_lib.build_tasks(
        seed=s.seed, tasks=split_list(s.tasks), n_train=s.n_train, n_heldout=s.n_heldout, heldout=s.heldout,
        heldout_fraction=s.heldout_fraction, plays=split_list(s.plays) or None, num_options=s.num_options,
        max_chars=s.max_chars, shuffle_options=s.shuffle_options)
  if data.source == "files":
    train = _records(split_list(data.train_paths))
    if not train:
      raise ConfigError(f"config.data.train_paths={data.train_paths!r} holds no records")
    return train, _records(split_list(data.eval_paths))
  raise ConfigError(f"config.data.source must be 'shakespeare' or 'files', got {data.source!r}")


def build_finetune_data(cfg, tokenizer) -> FinetuneData:
  train, heldout = records_from_config(cfg)
  opts = dict(truncation=cfg.data.truncation, on_error=cfg.data.on_error)
  if cfg.method == "dpo":
    if cfg.data.source == "shakespeare":
      train = tasks_lib.to_preferences(train, seed=cfg.seed)
    rows, summary = sft.build_dpo_rows(train, tokenizer, cfg.seq_len, **opts)
    eval_rows = eval_summary = None
  else:
    rows, summary = sft.build_sft_rows(train, tokenizer, cfg.seq_len, shuffle_seed=cfg.seed, **opts)
    eval_rows = eval_summary = None
    sft_heldout = [r for r in heldout if not (isinstance(r, dict) and "prompt" in r and "chosen" in r)]
    if sft_heldout:
      eval_rows, eval_summary = sft.build_sft_rows(sft_heldout, tokenizer, cfg.seq_len, **opts)
  if summary.rows == 0:
    raise ConfigError(f"no training rows: {summary}")
  for name, counted in (("training", summary), ("held-out", eval_summary)):
    if counted is not None and counted.skipped:  # the scripts log at WARNING: say it, not only in summary.json
      logging.warning("%s data: %d of %d records skipped %s, e.g. %s; raise seq_len, change data.truncation or "
                      "fix the records", name, sum(counted.skipped.values()), counted.samples, counted.skipped,
                      counted.errors[0])
  return FinetuneData(rows, eval_rows, [r for r in heldout if isinstance(r, dict)], summary, eval_summary)
