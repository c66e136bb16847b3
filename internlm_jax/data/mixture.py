"""Weighted mixtures of document sources, and the corpus spec syntax of `data.train_paths` / `data.val_paths`.

Spec syntax (comma-separated items):

    PATH[,PATH...]                   no weights: ONE source, exactly as before the mixture syntax existed: files
                                     and folders of one format, or a single "tfds:NAME_OR_DIR"
    COMPONENT[,COMPONENT...]         weights: a mixture, each item one component, every item weighted
    COMPONENT = [FORMAT:]PATH:WEIGHT[:FIELD]

    "web/:0.7,code.array_record:0.2:,tfds:/data/wiki:0.1"

PATH is a file, a folder (walked recursively, as for a single source) or, after `tfds:`, a tfds dataset name or
directory. FORMAT (text, jsonl, array_record, tfds) overrides `data.format` for that component; without it each
component's format is detected from its files, as for a single source. WEIGHT is a non-negative number;
weights are normalised to sum to 1, and a zero weight switches a component off (it is not even opened). FIELD
overrides `data.field` for the component; an empty FIELD (a trailing ':') asks for the format's default: "text"
for jsonl and tfds, the raw UTF-8 record for ArrayRecord. Parsing takes the weight from the right, so a path may
hold ':' (tfds:, tfds versions such as `tfds:wiki:1.0.0:0.5`); a path that itself ends in ':NUMBER' needs an
explicit weight after it.

Mixing (see `pipeline.make_pretrain_dataset`) is by document: each component is host-sharded, shuffled,
repeated and tokenized on its own and `grain.IterDataset.mix` interleaves the documents by weight. Components
are told apart by their order in the spec (shuffle seeds, iterator state), never by path, so moving the files
changes nothing, and a resumed run may change weights or append components.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import os
import re
from typing import Any, Iterable, Sequence

from internlm_jax.data.sources import SOURCE_FORMATS, DataError, make_source

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
# Greedy PATH: the weight is the last numeric ':'-part (or the one before a FIELD).
_WEIGHTED = re.compile(rf"^(?P<path>.+):(?P<weight>{_NUMBER})(?::(?P<field>[A-Za-z_][\w.\-]*)?)?$")
# "gs://..." and the like are paths, not a format prefix.
_FORMAT_PREFIX = re.compile(r"^(?P<format>[A-Za-z_]\w*):(?!//)(?P<rest>.+)$")


@dataclasses.dataclass(frozen=True)
class Component:
  """One mixture component: `name` labels it in logs and errors; `weight` is normalised; `spec` is as written;
  `position` is its place in the spec, zero-weight components counted (None: its place in the list given)."""
  name: str
  source: Any
  weight: float
  spec: str = ""
  position: int | None = None


class Mixture:
  """Sources mixed by weight. As a sequence it is the plain concatenation of the components (for code that just
  reads documents, such as the unigram baseline); the weighted, shuffled order comes from the pipeline.

  `components`: (name, source, weight) triples or `Component`s; weights are normalised; zero-weight components
  are dropped (their names kept in `off`).
  """

  def __init__(self, components: Iterable[Component | tuple], off: Sequence[str] = ()):
    parts = [c if isinstance(c, Component) else Component(*c) for c in components]
    if not parts:
      raise DataError("a data mixture needs at least one component")
    for c in parts:
      label = _label(c)
      if isinstance(c.weight, bool) or not isinstance(c.weight, (int, float)) or not math.isfinite(c.weight):
        raise DataError(f"mixture component {label}: weight must be a finite number, got {c.weight!r}")
      if c.weight < 0:
        raise DataError(f"mixture component {label}: weight must be >= 0, got {c.weight}")
      if c.weight > 0 and len(c.source) == 0:
        raise DataError(f"mixture component {label} has weight {c.weight} but holds no documents")
    # Positions count the zero-weight components too: switching one off must not move the others' shuffle seeds
    # and iterator states onto another component's.
    parts = [c if c.position is not None else dataclasses.replace(c, position=i) for i, c in enumerate(parts)]
    total = sum(c.weight for c in parts)
    if total <= 0:
      raise DataError(f"mixture weights sum to {total}; give at least one component a positive weight")
    self.components = tuple(dataclasses.replace(c, weight=c.weight / total) for c in parts if c.weight > 0)
    self.off = tuple(off) + tuple(c.name for c in parts if c.weight == 0)
    self._ends = []
    for c in self.components:
      self._ends.append((self._ends[-1] if self._ends else 0) + len(c.source))

  def __len__(self) -> int:
    return self._ends[-1]

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} out of range [0, {len(self)})")
    i = bisect.bisect_right(self._ends, index)
    return self.components[i].source[index - (self._ends[i - 1] if i else 0)]

  def describe(self) -> str:
    """One line for the log: per component its documents, normalised weight and how many mixed documents
    pass before it repeats (a small number means that component is seen for many epochs)."""
    parts = [f"{c.name} ({type(c.source).__name__}, {len(c.source)} docs, weight {c.weight:.4g}, repeats every "
             f"~{len(c.source) / c.weight:,.0f} mixed docs)" for c in self.components]
    off = f"; off (weight 0): {', '.join(self.off)}" if self.off else ""
    return f"data mixture of {len(self.components)}: " + "; ".join(parts) + off

  def __repr__(self) -> str:
    return f"Mixture({', '.join(f'{c.name!r}: {c.weight:.4g}' for c in self.components)})"


def _label(component: Component) -> str:
  return repr(component.spec or component.name)


def _items(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
  if isinstance(spec, (str, os.PathLike)):
    spec = [spec]
  return [p for item in spec for p in os.fspath(item).split(",") if p]


def parse_spec(spec) -> list[tuple[str, str | None, float, str | None]] | None:
  """(path, format or None, weight, field or None) per component of a weighted spec; None when the spec has no
  weights (it is then one plain source). A FIELD given empty comes back as "" (the format's default)."""
  items = _items(spec)
  matches = [_WEIGHTED.match(item.strip()) for item in items]
  if not any(matches):
    return None
  parsed = []
  for item, m in zip(items, matches):
    if m is None:
      raise DataError(f"mixture component {item.strip()!r} has no weight; give every component a weight "
                      "(PATH:WEIGHT) or none (one plain source)")
    path, field = m["path"].strip(), m["field"]
    if field is None and m.group(0).endswith(":"):
      field = ""
    fmt = None
    prefix = _FORMAT_PREFIX.match(path)
    if prefix and not os.path.exists(path):
      if prefix["format"] not in SOURCE_FORMATS:
        raise DataError(f"mixture component {item.strip()!r}: unknown format {prefix['format']!r} (known: "
                        f"{', '.join(SOURCE_FORMATS[1:])}), and no such path either")
      fmt = prefix["format"]
      path = prefix["rest"] if fmt != "tfds" else path
    parsed.append((path, fmt, float(m["weight"]), field))
  return parsed


def open_spec(spec, format: str = "auto", field: str | None = None, split: str = "file",  # noqa: A002
              max_chars: int = 0, tfds_split: str = "train"):
  """The corpus a spec names (module doc): a plain source (`make_source`) without weights, else a `Mixture`.

  `format` and `field` are the defaults of every component; the text and tfds options apply to all of them.
  Errors are one-line `DataError`s that name the component.
  """
  parsed = parse_spec(spec)
  if parsed is None:
    return make_source(_items(spec), format=format, field=field, split=split, max_chars=max_chars,
                       tfds_split=tfds_split)
  specs = [item.strip() for item in _items(spec)]
  names = [path if fmt in (None, "tfds") else f"{fmt}:{path}" for path, fmt, _, _ in parsed]
  bad = [(item, w) for item, (_, _, w, _) in zip(specs, parsed) if w < 0]
  if bad:
    raise DataError(f"mixture component {bad[0][0]!r}: weight must be >= 0, got {bad[0][1]:g}")
  if sum(w for _, _, w, _ in parsed) <= 0:
    raise DataError(f"mixture weights of {specs} sum to 0; give at least one component a positive weight")
  components, off = [], []
  for position, (name, item, (path, fmt, weight, comp_field)) in enumerate(zip(names, specs, parsed)):
    if weight == 0:
      off.append(name)
      continue
    try:
      source = make_source([path], format=fmt or format, field=field if comp_field is None else comp_field,
                           split=split, max_chars=max_chars, tfds_split=tfds_split)
    except DataError as e:
      raise DataError(f"mixture component {item!r}: {e}") from None
    components.append(Component(name, source, weight, item, position))
  return Mixture(components, off=off)
