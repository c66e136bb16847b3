"""A per-sample result cache: one append-only jsonl file of {key, value}, flushed after every batch.

Keys hash everything that determines a result (the request text or ids and the generation settings); the file
lives under a folder named by the model's fingerprint, so changed weights or prompts never reuse stale
results. A run killed mid-write leaves at most a torn last line, which loading skips: the evaluation then
resumes where it stopped and recomputes only what is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def request_key(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


class SampleCache:

  def __init__(self, path: str | None):
    self.path = path
    self._values: dict[str, Any] = {}
    self.hits = 0
    self._torn = False
    if path and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        for line in f:
          try:
            record = json.loads(line)
            self._values[record["key"]] = record["value"]
          except (ValueError, KeyError, TypeError):
            continue  # a torn line from an interrupted run
      with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
          f.seek(-1, os.SEEK_END)
          self._torn = f.read(1) != b"\n"  # appending right after it would spoil the next record too
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def __contains__(self, key: str) -> bool:
    return key in self._values

  def __len__(self) -> int:
    return len(self._values)

  def get(self, key: str) -> Any:
    self.hits += 1
    return self._values[key]

  def put_many(self, items: dict[str, Any]) -> None:
    self._values.update(items)
    if not self.path or not items:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      if self._torn:
        f.write("\n")
        self._torn = False
      for key, value in items.items():
        f.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
