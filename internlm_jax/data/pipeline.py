"""The pretraining input pipeline: source -> host shard -> shuffle/repeat -> tokenize [-> mix] -> pack -> batch.

    ds = make_pretrain_dataset(source, tokenizer, seq_len=512, batch_size=8, seed=0)
    it = iter(ds)
    batch = next(it)          # dict of int32 [8, 512]: tokens, targets, segment_ids, positions, loss_mask
    state = it.get_state()    # JSON-able; save it with the checkpoint
    it.set_state(state)       # later: yields exactly the batches the uninterrupted iterator would

Determinism: the document order depends only on (source, seed, shard_index, shard_count); each epoch is
reshuffled with seed + epoch (grain's `shuffle` then `repeat`). Documents are sharded by host before
shuffling, round-robin (`[shard_index::shard_count]`), so hosts read disjoint documents that together cover the
corpus; `batch_size` is the number of rows per host.

Mixtures (`mixture.Mixture`, from a weighted spec such as "web/:0.7,code.array_record:0.2,tfds:DIR:0.1"):
each component goes through the same shard -> shuffle/repeat -> tokenize steps on its own (its shuffle seed
derived from `seed` and its position), then `grain.IterDataset.mix` interleaves the documents by weight before
packing, so rows hold documents of several components. grain's mix is a deterministic interleave (3:1 weights
give exactly one document in four from the second component); the randomness is in each component's shuffle.
Blank documents are dropped before mixing, so the weights are shares of real documents (not of tokens: a
component of long documents gets more tokens than its weight). A repeating mixture never ends; with
`num_epochs` it ends as soon as any component runs out. A mixture of one component is that component's
plain pipeline, batch for batch. The iterator state holds each component's position (by order in the spec):
a run may be resumed with other weights, or with components appended, and each kept component continues where
it was (only the document being packed at the save may be cut short); reordering components swaps positions;
a component switched off (weight 0) keeps its place, so the others keep their seeds and states. A run that
started from one unweighted source cannot resume as a mixture, nor the reverse (the states differ in kind).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Sequence

import grain
import numpy as np

from internlm_jax.data.packing import PackIterDataset, pad_batch
from internlm_jax.data.mixture import Mixture
from internlm_jax.data.sources import DataError


def host_shard(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
  """(index, count) of this host's data shard: the arguments if given, else JAX's process index and count."""
  if shard_index is None and shard_count is None:
    import jax  # noqa: PLC0415  (only needed when the caller leaves sharding to the JAX runtime)
    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise DataError("pass both shard_index and shard_count, or neither (to use jax.process_index/count)")
  if not 0 <= shard_index < shard_count:
    raise DataError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
  return int(shard_index), int(shard_count)


def _tokenize(text: str, tokenizer) -> np.ndarray:
  return np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True), np.int32)


def _not_blank(text: str) -> bool:
  return bool(text.strip())


def _component_seed(seed: int, position: int) -> int:
  """A shuffle seed per component: equal-sized components must not share one permutation."""
  return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


def _documents(source, tokenizer, seed, shuffle, num_epochs, index, count, label) -> grain.MapDataset:
  """Token arrays of one source's host shard, shuffled per epoch and repeated; blank documents dropped."""
  total = len(source)
  ds = grain.MapDataset.source(source)[index::count]
  if len(ds) == 0:
    raise DataError(f"{label}data shard {index} of {count} is empty: the corpus has only {total} documents")
  # Blank documents are filtered out below; if all of them are blank, a repeating stream would spin forever
  # looking for one (and a one-epoch stream would be silently empty). Stops at the first non-blank document.
  if not any(_not_blank(ds[i]) for i in range(len(ds))):
    raise DataError(f"{label}data shard {index} of {count}: all {len(ds)} documents are empty or whitespace")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  return ds.filter(_not_blank).map(functools.partial(_tokenize, tokenizer=tokenizer))


class _ByPosition(grain.IterDataset):
  """The mixed documents, with the mix's per-component states keyed by spec position (`Component.position`, None
  for a component switched off by weight 0) instead of by place among the active components: a run resumed with
  a component switched off or on gives every other component its own state back."""

  def __init__(self, parent: grain.IterDataset, positions: Sequence[int]):
    super().__init__(parent)
    self._positions = tuple(positions)

  def __iter__(self) -> "_ByPositionIterator":
    return _ByPositionIterator(self._parent.__iter__(), self._positions)


class _ByPositionIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, positions: tuple[int, ...]):
    super().__init__(parent)
    self._positions = positions
    self._fresh = copy.deepcopy(parent.get_state()["parents"])  # for components the saved state does not hold

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    state = dict(self._parent.get_state())
    by_position: list[Any] = [None] * (max(self._positions) + 1)
    for position, parent_state in zip(self._positions, state["parents"]):
      by_position[position] = parent_state
    state["parents"] = by_position
    return state

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "parents" not in state:
      raise DataError("the data iterator state was saved by a single-source pipeline (no weights, or one weighted "
                      "component), not by a mixture; resume with the spec it was saved with")
    saved = state["parents"]
    parents = [saved[p] if p < len(saved) and saved[p] is not None else copy.deepcopy(fresh)
               for p, fresh in zip(self._positions, self._fresh)]
    self._parent.set_state(dict(state, parents=parents))


def make_pretrain_dataset(source: Sequence[str], tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                          shuffle: bool = True, num_epochs: int | None = None, shard_index: int | None = None,
                          shard_count: int | None = None, drop_remainder: bool = False,
                          num_threads: int = 1, prefetch_buffer_size: int = 64) -> grain.IterDataset:
  """Batches of packed rows (see `packing`) from a random-access source of text documents.

  Args:
    source: a sources.* object (or any sequence of strings), or a `mixture.Mixture` of them.
    tokenizer: the project's `Tokenizer`; each document gets one BOS and one EOS; padding uses `pad_id`.
    seq_len, batch_size: row length and rows per batch on this host.
    seed: shuffle seed (with `shuffle`); num_epochs: None repeats forever.
    shard_index, shard_count: this host's shard; default `jax.process_index()` / `jax.process_count()`.
    drop_remainder: drop a short final batch instead of padding it with empty rows (finite epochs only).
    num_threads, prefetch_buffer_size: grain read options for the tokenizing stage (0 threads = inline).
  """
  if seq_len < 2 or batch_size < 1:
    raise DataError(f"seq_len must be >= 2 and batch_size >= 1, got seq_len={seq_len}, batch_size={batch_size}")
  if num_epochs is not None and num_epochs < 1:
    raise DataError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
  if not 0 <= seed < 2**32:
    raise DataError(f"seed must be in [0, 2**32), got {seed}")
  index, count = host_shard(shard_index, shard_count)
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  if isinstance(source, Mixture) and len(source.components) == 1:  # a mixture of one is that source, batch for batch
    source = source.components[0].source
  if isinstance(source, Mixture):
    # A list, not a name-keyed mapping: states and seeds then follow the component's position in the spec, so the
    # batches (and a resume) do not depend on where the files are mounted.
    positions = [i if c.position is None else c.position for i, c in enumerate(source.components)]
    docs = grain.IterDataset.mix(
        [_documents(c.source, tokenizer, _component_seed(seed, p), shuffle, num_epochs, index, count,
                    f"mixture component {c.name!r}: ").to_iter_dataset(read_options)
         for p, c in zip(positions, source.components)],
        [c.weight for c in source.components])
    docs = _ByPosition(docs, positions)
  else:
    docs = _documents(source, tokenizer, seed, shuffle, num_epochs, index, count, "").to_iter_dataset(read_options)
  packed = PackIterDataset(docs, seq_len=seq_len, pad_id=tokenizer.pad_id)
  batched = packed.batch(batch_size, drop_remainder=drop_remainder)
  if not drop_remainder:
    batched = batched.map(functools.partial(pad_batch, batch_size=batch_size, pad_id=tokenizer.pad_id))
  return batched
