"""Random-access document sources: text files or folders, jsonl, ArrayRecord and tfds (without TensorFlow).

Every source is a grain `RandomAccessDataSource` of `str` documents (`len(source)`, `source[i]`), so the
pipeline can shard, shuffle and resume by index. Files are indexed once (byte offsets) and read lazily, so a
corpus larger than memory works and a shuffled read touches only the bytes of one document.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

TEXT_SPLITS = ("file", "paragraph")
# A blank line (possibly holding spaces) separates paragraphs.
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


class DataError(ValueError):
  """A corpus path, format or record is missing or invalid."""


def _as_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = [os.fspath(p) for p in paths]
  # Comma-separated lists come from flags and config strings.
  return [p for item in out for p in item.split(",") if p]


def expand_files(paths: str | os.PathLike | Iterable[str | os.PathLike], suffixes: Sequence[str] = ()) -> list[str]:
  """Files named by `paths`, folders walked recursively in sorted order (hidden entries skipped)."""
  files = []
  for path in _as_paths(paths):
    if os.path.isdir(path):
      for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names)
                  if not n.startswith(".") and (not suffixes or n.endswith(tuple(suffixes)))]
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise DataError(f"corpus path {path!r} does not exist; pass a text file or folder, a .jsonl file or an "
                      ".array_record file")
  if not files:
    raise DataError(f"corpus paths {_as_paths(paths)} hold no {'/'.join(suffixes) or 'data'} files")
  return files


class _ByteSpans:
  """Documents as (file, start, end) byte spans, read with one seek each."""

  def __init__(self, files: list[str], file_ids: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    self.files, self.file_ids, self.starts, self.ends = files, file_ids, starts, ends

  def __len__(self) -> int:
    return len(self.starts)

  def read(self, index: int) -> bytes:
    if not -len(self) <= index < len(self):
      raise IndexError(f"document {index} out of range [0, {len(self)})")
    with open(self.files[self.file_ids[index]], "rb") as f:
      f.seek(int(self.starts[index]))
      return f.read(int(self.ends[index] - self.starts[index]))

  def where(self, index: int) -> str:
    return self.files[self.file_ids[index]]


def _spans(files: list[str], cut) -> _ByteSpans:
  file_ids, starts, ends = [], [], []
  for i, path in enumerate(files):
    with open(path, "rb") as f:
      data = f.read()
    for start, end in cut(data):
      file_ids.append(i)
      starts.append(start)
      ends.append(end)
  return _ByteSpans(files, np.asarray(file_ids, np.int32), np.asarray(starts, np.int64), np.asarray(ends, np.int64))


def _paragraphs(data: bytes, max_bytes: int) -> list[tuple[int, int]]:
  """Spans of blank-line separated paragraphs; with `max_bytes`, consecutive ones are merged up to that size."""
  spans, start = [], 0
  for m in _BLANK_LINE.finditer(data):
    spans.append((start, m.start()))
    start = m.end()
  spans.append((start, len(data)))
  spans = [(s, e) for s, e in spans if data[s:e].strip()]
  if max_bytes <= 0:
    return spans
  merged: list[tuple[int, int]] = []
  for s, e in spans:
    if merged and e - merged[-1][0] <= max_bytes:
      merged[-1] = (merged[-1][0], e)  # the separator between them stays in the document
    else:
      merged.append((s, e))
  return merged


class TextSource:
  """Plain-text documents.

  split="file": one document per file (the whole file). split="paragraph": documents are blank-line separated
  paragraphs; with `max_chars` > 0, consecutive paragraphs of a file are grouped into documents of up to about
  that many characters (counted in UTF-8 bytes), keeping their separators, which gives documents long enough to
  learn context from while still shuffling at a finer grain than whole files.
  """

  def __init__(self, paths, split: str = "file", max_chars: int = 0, suffixes: Sequence[str] = ()):
    if split not in TEXT_SPLITS:
      raise DataError(f"text split must be one of {TEXT_SPLITS}, got {split!r}")
    files = expand_files(paths, suffixes)
    if split == "file":
      self._spans = _ByteSpans(files, np.arange(len(files), dtype=np.int32), np.zeros(len(files), np.int64),
                               np.asarray([os.path.getsize(f) for f in files], np.int64))
    else:
      self._spans = _spans(files, lambda data: _paragraphs(data, max_chars))
    self.files = files

  def __len__(self) -> int:
    return len(self._spans)

  def __getitem__(self, index: int) -> str:
    return self._spans.read(index).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return f"TextSource({len(self.files)} files, {len(self)} documents)"


def _lines(data: bytes) -> list[tuple[int, int]]:
  spans, start = [], 0
  for end in [m.start() for m in re.finditer(rb"\n", data)] + [len(data)]:
    if data[start:end].strip():
      spans.append((start, end))
    start = end + 1
  return spans


class JsonlSource:
  """One JSON object per line; the document is the string at `field` (blank lines are skipped)."""

  def __init__(self, paths, field: str = "text", suffixes: Sequence[str] = (".jsonl", ".json")):
    self.field = field
    self._spans = _spans(expand_files(paths, suffixes), _lines)

  def __len__(self) -> int:
    return len(self._spans)

  def __getitem__(self, index: int) -> str:
    line = self._spans.read(index)
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{self._spans.where(index)}: record {index} is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:  # json.loads decodes the bytes first; a bare traceback otherwise
      raise DataError(f"{self._spans.where(index)}: record {index} is not UTF-8 text ({e.reason}); re-encode "
                      "the file as UTF-8") from None
    return _field(record, self.field, f"{self._spans.where(index)}: record {index}")

  def __repr__(self) -> str:
    return f"JsonlSource({len(self._spans.files)} files, {len(self)} documents, field={self.field!r})"


def _field(record: Any, field: str | None, where: str) -> str:
  value = record if field is None else (record.get(field) if isinstance(record, dict) else None)
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  if not isinstance(value, str):
    raise DataError(f"{where} has no string field {field!r}; set the source's `field` to the text column")
  return value


class ArrayRecordSource:
  """ArrayRecord files read with grain: each record is UTF-8 text, or (with `field`) a JSON object."""

  def __init__(self, paths, field: str | None = None):
    import grain  # noqa: PLC0415  (kept local: importing grain is slow and only ArrayRecord needs it here)
    files = expand_files(paths)
    try:
      self._source = grain.sources.ArrayRecordDataSource(files)
    except Exception as e:  # array_record raises bare RuntimeErrors for unreadable files
      raise DataError(f"cannot open {files} as ArrayRecord: {str(e).splitlines()[0]}") from None
    self.field, self.files = field, files

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    record = self._source[index]
    if self.field is None:
      return record.decode("utf-8", errors="replace")
    try:
      return _field(json.loads(record), self.field, f"ArrayRecord record {index}")
    except json.JSONDecodeError:
      raise DataError(f"ArrayRecord record {index} of {self.files} is not JSON; drop `field` for raw text") from None

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.files)} files, {len(self)} records)"


class TfdsSource:
  """A tfds dataset prepared with `file_format="array_record"`, read without TensorFlow.

  `name_or_dir` is a dataset directory (holding `dataset_info.json`; read with `builder_from_directory`) or a
  registered name under `data_dir` (read with `tfds.data_source`; nothing is downloaded).
  """

  def __init__(self, name_or_dir: str, split: str = "train", field: str = "text", data_dir: str | None = None):
    try:
      import tensorflow_datasets as tfds  # noqa: PLC0415  (optional dependency)
    except ImportError:
      raise DataError("tfds sources need `pip install tensorflow-datasets importlib_resources`") from None
    try:
      if os.path.isdir(name_or_dir):
        self._source = tfds.builder_from_directory(name_or_dir).as_data_source(split=split)
      else:
        self._source = tfds.data_source(name_or_dir, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many kinds (DatasetNotFoundError, FileNotFoundError, ...)
      raise DataError(f"cannot open tfds dataset {name_or_dir!r} split {split!r}: {str(e).splitlines()[0]}") from None
    self.name, self.split, self.field = name_or_dir, split, field

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    return _field(self._source[index], self.field, f"tfds {self.name!r}[{self.split}] example {index}")

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


SOURCE_FORMATS = ("auto", "text", "jsonl", "array_record", "tfds")


def make_source(paths, format: str = "auto", field: str | None = None, split: str = "file",  # noqa: A002
                max_chars: int = 0, tfds_split: str = "train"):
  """A source from paths and a format; "auto" picks by extension (.jsonl/.json, .array_record*, else text).

  A `tfds:NAME_OR_DIR` path (or format="tfds") opens a tfds ArrayRecord dataset; it must be the only path. `field`
  names the text column of jsonl and tfds records (default "text"); ArrayRecord records are raw UTF-8 text unless
  `field` is given. Several sources mixed by weight: `mixture.open_spec`.
  """
  if format not in SOURCE_FORMATS:
    raise DataError(f"source format must be one of {SOURCE_FORMATS}, got {format!r}")
  items = _as_paths(paths)
  if not items:
    raise DataError("no corpus paths given")
  if format == "tfds" or any(item.startswith("tfds:") for item in items):
    if len(items) > 1:  # a second path used to be dropped without a word
      raise DataError(f"a tfds dataset must be the only path of a source, got {items}; to combine sources give "
                      "each a weight (PATH:WEIGHT,...; see internlm_jax/data/mixture.py)")
    return TfdsSource(items[0].removeprefix("tfds:"), split=tfds_split, field=field or "text")
  if format == "auto":
    files = expand_files(items)
    kinds = {"jsonl" if f.endswith((".jsonl", ".json")) else
             "array_record" if ".array_record" in os.path.basename(f) else "text" for f in files}
    if len(kinds) > 1:
      raise DataError(f"corpus paths {items} mix formats {sorted(kinds)}; pass one format per source")
    format = kinds.pop()  # noqa: A001
  if format == "jsonl":
    return JsonlSource(items, field=field or "text")
  if format == "array_record":  # an empty field (a config's "") means raw text records, as None does
    return ArrayRecordSource(items, field=field or None)
  return TextSource(items, split=split, max_chars=max_chars)
