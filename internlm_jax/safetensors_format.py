"""The safetensors file format, read lazily through a memory map and written shard by shard.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]}} (plus
an optional "__metadata__"), then the data; offsets are relative to the end of the header. Reading it directly
(instead of through the safetensors package) gives bfloat16 slices without copying a whole tensor.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class CheckpointError(ValueError):
  """An HF checkpoint folder that cannot be read as (or written as) InternLM2; the message names the culprit."""


class SafetensorsFile:
  """One .safetensors file: the header is parsed at once; tensor bytes are memory-mapped and read on slicing.

  Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]}}
  (plus an optional "__metadata__"), then the data; offsets are relative to the end of the header.
  """

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
      if n < 2 or 8 + n > size:
        raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    self.data_start = 8 + n
    self.entries: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}
    for name, e in header.items():
      if name == "__metadata__":
        continue
      if e.get("dtype") not in ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {e.get('dtype')}; only F32, BF16 and F16 load")
      begin, end = e["data_offsets"]
      shape, dtype = tuple(int(s) for s in e["shape"]), ST_DTYPES[e["dtype"]]
      if end - begin != int(np.prod(shape)) * dtype.itemsize or self.data_start + end > size:
        raise CheckpointError(f"{path}: tensor {name} has inconsistent or truncated data offsets")
      self.entries[name] = (shape, dtype, begin, end)
    self._mmap = None

  def tensor(self, name: str) -> np.ndarray:
    """A memory-mapped view: no bytes are read until it is sliced and copied."""
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    shape, dtype, begin, end = self.entries[name]
    return self._mmap[self.data_start + begin:self.data_start + end].view(dtype).reshape(shape)


def plan_shards(entries: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int):
  """Greedy split in HF order: [[(name, shape, dtype, begin, end), ...] per file]; a tensor never spans files."""
  shards, current, used = [], [], 0
  for name, shape, dtype in entries:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if current and used + nbytes > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append((name, shape, dtype, used, used + nbytes))
    used += nbytes
  if current:
    shards.append(current)
  return shards


def header_bytes(shard) -> bytes:
  header = {"__metadata__": {"format": "pt"}}  # transformers refuses safetensors files without format "pt"
  for name, shape, dtype, begin, end in shard:
    header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as the reference writer does
  return struct.pack("<Q", len(raw)) + raw
