"""Paged KV cache: per-layer page arrays on device and the host-side page allocator that hands pages out.

Shapes: L layers, K kv heads, P pages in the pool, ps page_size, D head_dim, B slots, pps pages per sequence.
  PagedKVCache.k[i], .v[i]   [K, P, ps, D]  (model dtype, or int8 with .k_scale[i], .v_scale[i] [K, P, ps] f32)
                             or [K, P, ps, D // 2] uint8 for int4: two values a byte, with .k_scale[i], .v_scale[i]
                             and .k_zero[i], .v_zero[i] [K, P, ps] f32 (kernels/paged_attention_reference.py)
  PageAllocator.page_table   [B, pps] int32 (0 = no page)     PageAllocator.lengths [B] int32

Page 0 is scratch: it is never handed out, so page-table entries past a sequence's end (0) and the writes of idle
slots (redirected to page 0) can never touch a live sequence. Attention masks by length, so stale data left in a
freed page is never read by its next owner.

Prefix caching: a full page of prompt tokens is keyed by a chained hash of every token up to its end (so a page
matches only when the whole prefix before it matches too). Pages are reference-counted; a cached page whose
count drops to zero stays cached but evictable (LRU) and is reclaimed only when the free list runs dry.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules

SCRATCH_PAGE = 0
PAGE_AXES = ("kv_heads", None, None, "head_dim")  # logical axes of one layer's [K, P, ps, D] pages
SCALE_AXES = ("kv_heads", None, None)
KV_DTYPES = (None, "int8", "int4")  # None: the model dtype


class CacheFullError(RuntimeError):
  """Not enough free pages right now; the request can wait for others to finish."""


class RequestTooLargeError(ValueError):
  """A request needs more pages (or positions) than the cache can ever give one sequence."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
  """One [K, P, ps, D] array per layer for keys and values (a tuple, so each layer updates in place)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  k_scale: tuple[jax.Array, ...] | None = None
  v_scale: tuple[jax.Array, ...] | None = None
  k_zero: tuple[jax.Array, ...] | None = None  # int4 only: the per-token minimum (asymmetric quantization)
  v_zero: tuple[jax.Array, ...] | None = None

  @property
  def num_pages(self) -> int:
    return self.k[0].shape[1]

  @property
  def page_size(self) -> int:
    return self.k[0].shape[2]

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None

  @property
  def int4(self) -> bool:
    return self.k_zero is not None


def _check_kv_dtype(config: ModelConfig, kv_dtype: str | None) -> None:
  # jnp.dtype("int4") exists, so without this an int4 request would silently build unpacked 4-bit arrays.
  if kv_dtype not in KV_DTYPES:
    raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
  if kv_dtype == "int4" and config.head_dim % 2:
    raise ValueError(f"int4 KV packs two values a byte along head_dim, which must be even; got {config.head_dim}")


def bytes_per_page(config: ModelConfig, page_size: int, kv_dtype: str | None = None) -> int:
  """Device bytes one page costs across all layers, keys and values (plus per-token scales for int8, scales and
  zeros for int4)."""
  _check_kv_dtype(config, kv_dtype)
  if kv_dtype == "int4":
    per_token = config.num_kv_heads * (config.head_dim // 2 + 8)
    return 2 * config.num_layers * page_size * per_token
  dtype = jnp.dtype(kv_dtype or config.dtype)
  per_token = config.num_kv_heads * (config.head_dim * dtype.itemsize + (4 if dtype == jnp.int8 else 0))
  return 2 * config.num_layers * page_size * per_token


def pages_for_budget(config: ModelConfig, budget_bytes: int, page_size: int, kv_dtype: str | None = None) -> int:
  """How many pages (scratch page included) fit in `budget_bytes` of device memory."""
  num = int(budget_bytes) // bytes_per_page(config, page_size, kv_dtype)
  if num < 2:
    raise RequestTooLargeError(
        f"a KV budget of {budget_bytes} bytes holds {num} page(s) of {page_size} tokens "
        f"({bytes_per_page(config, page_size, kv_dtype)} bytes each); at least 2 are needed (one is scratch)")
  return num


def init_paged_cache(config: ModelConfig, num_pages: int, page_size: int, kv_dtype: str | None = None, *,
                     mesh=None, rules: ShardingRules = DEFAULT_RULES) -> PagedKVCache:
  """Zeroed pages, sharded over kv heads on `mesh` (tensor parallel) when one is given."""
  _check_kv_dtype(config, kv_dtype)
  int4 = kv_dtype == "int4"
  dtype = jnp.uint8 if int4 else jnp.dtype(kv_dtype or config.dtype)
  shape = (config.num_kv_heads, num_pages, page_size, config.head_dim // 2 if int4 else config.head_dim)
  quantized = int4 or dtype == jnp.int8

  def make(shape, dtype, axes):
    if mesh is None:
      return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=rules.sharding(mesh, axes))()

  L = config.num_layers
  k = tuple(make(shape, dtype, PAGE_AXES) for _ in range(L))
  v = tuple(make(shape, dtype, PAGE_AXES) for _ in range(L))
  if not quantized:
    return PagedKVCache(k, v)
  ones = lambda: tuple(make(shape[:3], jnp.float32, SCALE_AXES) for _ in range(L))
  if int4:
    return PagedKVCache(k, v, ones(), ones(), ones(), ones())
  return PagedKVCache(k, v, ones(), ones())


def page_hashes(tokens: Sequence[int], page_size: int, salt: int = 0) -> list[bytes]:
  """Chained hash of each full page of `tokens`: page i's key covers tokens[: (i + 1) * page_size]. A nonzero
  `salt` (the LoRA adapter a sequence runs with: its keys and values differ) starts another chain."""
  out, parent = [], (b"" if not salt else b"adapter:%d" % salt)
  arr = np.asarray(tokens, np.int64)
  for i in range(len(arr) // page_size):
    parent = hashlib.blake2b(parent + arr[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
    out.append(parent)
  return out


class PageAllocator:
  """Host bookkeeping of the page pool: free list, per-slot page tables and lengths, refcounts, prefix cache.

  Not thread-safe: one scheduler thread owns it.
  """

  def __init__(self, num_pages: int, page_size: int, max_slots: int, pages_per_seq: int,
               prefix_caching: bool = True):
    if num_pages < 2:
      raise RequestTooLargeError(f"num_pages must be at least 2 (page 0 is scratch), got {num_pages}")
    if page_size < 1 or max_slots < 1 or pages_per_seq < 1:
      raise ValueError(f"page_size ({page_size}), max_slots ({max_slots}) and pages_per_seq ({pages_per_seq}) "
                       "must be positive")
    self.num_pages, self.page_size = num_pages, page_size
    self.max_slots, self.pages_per_seq = max_slots, pages_per_seq
    self.prefix_caching = prefix_caching
    self.page_table = np.zeros((max_slots, pages_per_seq), np.int32)
    self.lengths = np.zeros((max_slots,), np.int32)
    self.slot_pages: list[list[int]] = [[] for _ in range(max_slots)]
    self.refcount = np.zeros((num_pages,), np.int32)
    self._free = collections.deque(range(1, num_pages))
    self._hash_to_page: dict[bytes, int] = {}
    self._page_to_hash: dict[int, bytes] = {}
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
    self.version = 0  # bumped whenever a page table changes, so the engine knows to re-upload it

  # ---- capacity ---------------------------------------------------------------------------------------------
  @property
  def usable_pages(self) -> int:
    return self.num_pages - 1

  @property
  def max_tokens_per_seq(self) -> int:
    return min(self.pages_per_seq, self.usable_pages) * self.page_size

  @property
  def num_available(self) -> int:
    """Pages a new request could get now: free ones plus cached pages nobody holds."""
    return len(self._free) + len(self._evictable)

  @property
  def num_cached(self) -> int:
    return len(self._page_to_hash)

  def pages_for(self, num_tokens: int) -> int:
    return -(-int(num_tokens) // self.page_size)

  def check_fits(self, num_tokens: int) -> None:
    """Raises RequestTooLargeError when one sequence of `num_tokens` could never be held, even alone."""
    if num_tokens > self.max_tokens_per_seq:
      raise RequestTooLargeError(
          f"{num_tokens} tokens need {self.pages_for(num_tokens)} pages of {self.page_size}, but one sequence "
          f"can hold at most {self.max_tokens_per_seq} tokens (pool of {self.usable_pages} pages, "
          f"{self.pages_per_seq} pages per sequence)")

  # ---- pages ------------------------------------------------------------------------------------------------
  def allocate(self, n: int) -> list[int]:
    """n fresh pages (refcount 1), evicting least recently used cached pages when the free list is short."""
    if n > self.num_available:
      raise CacheFullError(f"need {n} pages, {self.num_available} available of {self.usable_pages}")
    pages = []
    for _ in range(n):
      if self._free:
        page = self._free.popleft()
      else:
        page, _ = self._evictable.popitem(last=False)
        del self._hash_to_page[self._page_to_hash.pop(page)]
      self.refcount[page] = 1
      pages.append(page)
    return pages

  def release(self, pages: Sequence[int]) -> None:
    """Drops one reference to each page; unreferenced pages go back to the pool (cached ones stay findable)."""
    for page in pages:
      if self.refcount[page] <= 0:
        raise AssertionError(f"page {page} released more often than it was taken")
      self.refcount[page] -= 1
      if self.refcount[page] == 0:
        if page in self._page_to_hash:
          self._evictable[page] = None
        else:
          self._free.append(page)

  def match_prefix(self, hashes: Sequence[bytes], max_pages: int) -> list[int]:
    """Cached pages for the longest run of leading `hashes` (at most max_pages), each with a new reference."""
    if not self.prefix_caching:
      return []
    pages = []
    for key in hashes[:max_pages]:
      page = self._hash_to_page.get(key)
      if page is None:
        break
      if self.refcount[page] == 0:
        del self._evictable[page]
      self.refcount[page] += 1
      pages.append(page)
    return pages

  def register(self, page: int, key: bytes) -> None:
    """Makes a full, already written page findable by its prefix hash (first writer wins on duplicates)."""
    if not self.prefix_caching or key in self._hash_to_page or page in self._page_to_hash:
      return
    self._hash_to_page[key] = page
    self._page_to_hash[page] = key

  def clear_prefix_cache(self) -> None:
    """Forgets every cached prefix; unreferenced cached pages return to the free list."""
    for page in list(self._evictable):
      self._free.append(page)
    self._evictable.clear()
    self._hash_to_page.clear()
    self._page_to_hash.clear()

  # ---- slots ------------------------------------------------------------------------------------------------
  def assign(self, slot: int, pages: Sequence[int], length: int) -> None:
    """Hands `pages` (already referenced) and a cached length to an empty slot."""
    if self.slot_pages[slot]:
      raise AssertionError(f"slot {slot} is still holding pages")
    if len(pages) > self.pages_per_seq or self.pages_for(length) > len(pages):
      raise AssertionError(f"slot {slot}: {len(pages)} pages for {length} tokens")
    self.slot_pages[slot] = list(pages)
    self.page_table[slot] = 0
    self.page_table[slot, :len(pages)] = pages
    self.lengths[slot] = length
    self.version += 1

  def reserve(self, slot: int, num_tokens: int) -> None:
    """Makes sure the slot's pages can hold `num_tokens` tokens; CacheFullError (nothing taken) if not now."""
    self.check_fits(num_tokens)
    need = self.pages_for(num_tokens) - len(self.slot_pages[slot])
    if need <= 0:
      return
    new = self.allocate(need)
    start = len(self.slot_pages[slot])
    self.slot_pages[slot].extend(new)
    self.page_table[slot, start:start + need] = new
    self.version += 1

  def free_slot(self, slot: int) -> None:
    self.release(self.slot_pages[slot])
    self.slot_pages[slot] = []
    self.page_table[slot] = 0
    self.lengths[slot] = 0
    self.version += 1

  def check_invariants(self) -> None:
    """Every page is exactly one of: free, evictable-cached, or referenced as often as it is held (tests)."""
    held = collections.Counter(p for pages in self.slot_pages for p in pages)
    free, evictable = set(self._free), set(self._evictable)
    assert len(free) == len(self._free), "a page is on the free list twice"
    assert SCRATCH_PAGE not in free and SCRATCH_PAGE not in held, "the scratch page was handed out"
    for page in range(1, self.num_pages):
      states = (page in free) + (page in evictable) + (self.refcount[page] > 0)
      assert states == 1, f"page {page}: free={page in free} evictable={page in evictable} " \
                          f"refcount={self.refcount[page]}"
      assert held[page] <= self.refcount[page], f"page {page} held {held[page]}x, refcount {self.refcount[page]}"


def pages_per_sequence(max_seq_len: int, page_size: int) -> int:
  return math.ceil(max_seq_len / page_size)
