"""Packing token sequences into fixed-length rows with segment ids and per-document positions.

Documents are concatenated in stream order and cut at row boundaries ("concat then split"): rows are full except
the last one, and no token is dropped. Each piece of a document in a row is one segment: `segment_ids` count
1, 2, ... within the row (0 = padding) and `positions` restart at 0, so attention masked by segment never lets
a document see another, and a continuation piece in the next row attends only to itself (as InternEvo's packed
dataset with `pack_sample_into_one=False`). `targets[i]` is the document's next token, even when that token
starts the next row; `loss_mask` is 0 on padding and on each document's final token, so every token but each
document's first is a target exactly once.

The iterator's state is the parent's state before the partially packed document plus an offset into it: a small
JSON-able dict, restored exactly.
"""
from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

ROW_FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def empty_rows(num_rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """All-padding rows: pad tokens, segment 0, no loss."""
  rows = {name: np.zeros((num_rows, seq_len), np.int32) for name in ROW_FIELDS}
  rows["tokens"][:] = pad_id
  rows["targets"][:] = pad_id
  return rows


class PackIterDataset(grain.IterDataset):
  """Packs a stream of 1-D int token arrays (one per document) into rows of `seq_len` (see module doc)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int):
    super().__init__(parent)
    if seq_len < 2:
      raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    self._seq_len, self._pad_id = int(seq_len), int(pad_id)

  def __iter__(self) -> "_PackIterator":
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len, self._pad_id = seq_len, pad_id
    self._doc: np.ndarray | None = None  # the document being packed, None between documents
    self._doc_state: dict[str, Any] | None = None  # parent state from just before `_doc` was read
    self._offset = 0  # tokens of `_doc` already packed

  def _next_doc(self) -> bool:
    self._doc_state = copy.deepcopy(self._parent.get_state())
    try:
      doc = next(self._parent)
    except StopIteration:
      self._doc_state = None
      return False
    self._doc, self._offset = np.asarray(doc, np.int32).reshape(-1), 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    row = {name: array[0] for name, array in empty_rows(1, self._seq_len, self._pad_id).items()}
    fill, segment = 0, 0
    while fill < self._seq_len:
      if self._doc is None and not self._next_doc():
        break
      doc, start = self._doc, self._offset
      take = min(self._seq_len - fill, len(doc) - start)
      if take <= 0:  # an empty document
        self._doc = None
        continue
      segment += 1
      span = slice(fill, fill + take)
      row["tokens"][span] = doc[start:start + take]
      row["segment_ids"][span] = segment
      row["positions"][span] = np.arange(take, dtype=np.int32)
      # Next tokens of the document: one fewer than `take` when the piece ends the document.
      following = doc[start + 1:start + take + 1]
      row["targets"][fill:fill + len(following)] = following
      row["loss_mask"][fill:fill + len(following)] = 1
      fill += take
      self._offset = start + take
      if self._offset == len(doc):
        self._doc = None
    if fill == 0:
      raise StopIteration
    return row

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0}
    return {"parent": copy.deepcopy(self._doc_state), "offset": int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._doc, self._offset = None, 0
    if state["offset"]:
      if not self._next_doc():
        raise ValueError("data iterator state points past the end of its data; was it saved by another pipeline?")
      self._offset = int(state["offset"])

  def __str__(self) -> str:
    return f"PackIterator(seq_len={self._seq_len})"


def pad_batch(batch: dict[str, np.ndarray], batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with all-padding rows, so every batch has one static shape."""
  missing = batch_size - len(batch["tokens"])
  if missing <= 0:
    return batch
  seq_len = batch["tokens"].shape[1]
  extra = empty_rows(missing, seq_len, pad_id)
  return {name: np.concatenate([batch[name], extra[name]]) for name in batch}
