"""Fine-tuning data from a config: packed SFT rows or DPO pair rows, held-out rows and held-out records.

config.data.source:
  "shakespeare"  the built-in instruction tasks (data.shakespeare_tasks) with their own held-out records; DPO
                 pairs are made from both (gold answer chosen, a wrong one rejected).
  "files"        comma-separated .jsonl / .json files: SFT records in any data.sft format (alpaca, messages,
                 conversation) or, for method "dpo", preference records {"prompt", "chosen", "rejected"}.
data.eval_paths (optional, either source; they replace the built-in held-out records) are held out: for SFT their
SFT records give eval_loss, for DPO their preference records give the held-out DPO loss and rewards; records that
carry "options" and "answer" (the multiple-choice format of shakespeare_tasks) are also scored for accuracy. Each
method skips the other's records; a held-out record of neither kind fails or is skipped as in training data.
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
  eval_rows: dict | None    # rows of the held-out records as train_rows (None without held-out data)
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
  eval_paths = split_list(data.eval_paths)
  if data.source == "shakespeare":
    s = data.shakespeare
    train, heldout = tasks_lib.build_tasks(
        seed=s.seed, tasks=split_list(s.tasks), n_train=s.n_train, n_heldout=s.n_heldout, heldout=s.heldout,
        heldout_fraction=s.heldout_fraction, plays=split_list(s.plays) or None, num_options=s.num_options,
        max_chars=s.max_chars, shuffle_options=s.shuffle_options)
    return train, (_records(eval_paths) if eval_paths else heldout)
  if data.source == "files":
    train = _records(split_list(data.train_paths))
    if not train:
      raise ConfigError(f"config.data.train_paths={data.train_paths!r} holds no records")
    return train, _records(eval_paths)
  raise ConfigError(f"config.data.source must be 'shakespeare' or 'files', got {data.source!r}")


def _is_pair(record) -> bool:
  return isinstance(record, dict) and "prompt" in record and "chosen" in record


def _is_choice(record) -> bool:
  """A multiple-choice SFT record (scored for accuracy), not a malformed preference pair."""
  return isinstance(record, dict) and bool(record.get("options")) and not _is_pair(record)


def _heldout_rows(build, records, what: str):
  """(rows, summary) of held-out records, or (None, None) without any; errors say the records were held out."""
  if not records:
    return None, None
  try:
    rows, summary = build(records)
  except sft.SFTDataError as e:
    raise sft.SFTDataError(f"held-out {what}: {e}") from None
  if summary.rows == 0:  # caught now rather than at the first evaluation, after training steps were spent
    raise ConfigError(f"no held-out rows: {summary}" + (f", e.g. {summary.errors[0]}" if summary.errors else ""))
  return rows, summary


def build_finetune_data(cfg, tokenizer) -> FinetuneData:
  train, heldout = records_from_config(cfg)
  opts = dict(truncation=cfg.data.truncation, on_error=cfg.data.on_error)
  eval_files = bool(split_list(cfg.data.eval_paths))
  if cfg.method == "dpo":
    build = lambda records: sft.build_dpo_rows(records, tokenizer, cfg.seq_len, **opts)
    if cfg.data.source == "shakespeare":
      train = tasks_lib.to_preferences(train, seed=cfg.seed)
    # The built-in held-out records become pairs as the training records do; held-out files hold pairs already.
    eval_records = (tasks_lib.to_preferences(heldout, seed=cfg.seed) if cfg.data.source == "shakespeare" and
                    not eval_files else [r for r in heldout if not _is_choice(r)])
    rows, summary = build(train)
  else:
    build = lambda records: sft.build_sft_rows(records, tokenizer, cfg.seq_len, **opts)
    eval_records = [r for r in heldout if not _is_pair(r)]
    rows, summary = sft.build_sft_rows(train, tokenizer, cfg.seq_len, shuffle_seed=cfg.seed, **opts)
  if summary.rows == 0:
    raise ConfigError(f"no training rows: {summary}")
  eval_rows, eval_summary = _heldout_rows(build, eval_records,
                                          "records of config.data.eval_paths" if eval_files else "records")
  for name, counted in (("training", summary), ("held-out", eval_summary)):
    if counted is not None and counted.skipped:  # the scripts log at WARNING: say it, not only in summary.json
      logging.warning("%s data: %d of %d records skipped %s, e.g. %s; raise seq_len, change data.truncation or "
                      "fix the records", name, sum(counted.skipped.values()), counted.samples, counted.skipped,
                      counted.errors[0])
  return FinetuneData(rows, eval_rows, [r for r in heldout if isinstance(r, dict)], summary, eval_summary)
