"""The serving engine's state and configuration types: EngineConfig (frozen), the device state SlotState and
DecodeState (registered dataclasses), a prefilled Prefix, and a generate call's StepResult; plus the prefill
length buckets. The engine itself is engine.py.

Shapes: B slots, V vocab, n steps per generate call, N top logprobs, pps pages per sequence.
  SlotState: per-slot rows [B] (and logits, seen, counts [B, V], stop_ids [B, MAX_STOP_IDS], bias_ids and
  bias_values [B, MAX_LOGIT_BIAS], the guided-decoding bitmask allowed [B, W], W = ceil(V / 32))
  StepResult: tokens, valid, logprob [n, B]; top_ids, top_logprobs [n, B, N]
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.serve import sampling
from internlm_jax.serve.kv_cache import KV_DTYPES, PagedKVCache


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  max_slots: int = 8  # B: sequences decoded together
  max_seq_len: int | None = None  # prompt + output per sequence; default the model's max_position_embeddings
  page_size: int = 16
  num_pages: int | None = None  # pool size (scratch page included); default from kv_budget_bytes or full capacity
  kv_budget_bytes: int | None = None
  kv_dtype: str | None = None  # None: the model dtype; "int8": per-token quantized pages; "int4": packed, asymmetric
  prefill_chunk: int = 512  # longest prefill piece (a power of two)
  steps_per_call: int = 8  # decode steps per host round trip
  min_decode_bucket: int = 8  # fewest rows a decode call runs (see the module docstring); max_slots: no buckets
  prefix_caching: bool = True
  attention_kernel: bool | None = None  # Pallas paged attention; default on GPU/TPU (CPU: native/decode_attention)
  sample_vocab: int | None = None  # sample only ids below this (a tokenizer smaller than the padded model vocab)

  def __post_init__(self):
    if self.kv_dtype not in KV_DTYPES:
      raise ValueError(f"kv_dtype must be one of {', '.join(map(repr, KV_DTYPES))}; got {self.kv_dtype!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
  logits: jax.Array  # [B, V] float32: the distribution of each slot's next token
  lengths: jax.Array  # [B] tokens in the cache
  active: jax.Array  # [B] bool
  remaining: jax.Array  # [B] tokens the slot may still produce
  step: jax.Array  # [B] tokens produced so far (the sampling key index)
  seed: jax.Array  # [B] uint32
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  repetition_penalty: jax.Array
  want_top: jax.Array  # [B] bool: compute top-N logprobs
  seen: jax.Array  # [B, V] bool: tokens the repetition penalty applies to
  presence_penalty: jax.Array
  frequency_penalty: jax.Array
  counts: jax.Array  # [B, V] int16: times each token was generated (presence/frequency penalties)
  bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS] int32, -1 padded: sparse logit bias (a dense row is a [B, V] pass)
  bias_values: jax.Array  # [B, MAX_LOGIT_BIAS] float32
  stop_ids: jax.Array  # [B, MAX_STOP_IDS] int32, -1 padded
  allowed: jax.Array  # [B, W] uint32 token bitmask of guided decoding (W = ceil(V / 32)); all ones when unguided
  guided: jax.Array  # [B] bool: the slot's logits are masked by `allowed`
  adapter: jax.Array  # [B] int32: the slot's LoRA adapter (adapters.py; 0: the base model)
  min_tokens: jax.Array  # [B] int32: stop ids are masked while step < min_tokens


def empty_slots(B: int, V: int, mask_words: int) -> SlotState:
  """B idle slots over a V-token vocabulary: nothing active, neutral sampling settings, every token allowed."""
  zeros = lambda dtype: jnp.zeros((B,), dtype)
  return SlotState(
      logits=jnp.zeros((B, V), jnp.float32), lengths=zeros(jnp.int32), active=zeros(bool),
      remaining=zeros(jnp.int32), step=zeros(jnp.int32), seed=zeros(jnp.uint32), temperature=zeros(jnp.float32),
      top_k=zeros(jnp.int32), top_p=jnp.ones((B,), jnp.float32), min_p=zeros(jnp.float32),
      repetition_penalty=jnp.ones((B,), jnp.float32), want_top=zeros(bool), seen=jnp.zeros((B, V), bool),
      presence_penalty=zeros(jnp.float32), frequency_penalty=zeros(jnp.float32),
      counts=jnp.zeros((B, V), jnp.int16), bias_ids=jnp.full((B, sampling.MAX_LOGIT_BIAS), -1, jnp.int32),
      bias_values=jnp.zeros((B, sampling.MAX_LOGIT_BIAS), jnp.float32),
      stop_ids=jnp.full((B, sampling.MAX_STOP_IDS), -1, jnp.int32),
      allowed=jnp.full((B, mask_words), 0xFFFFFFFF, jnp.uint32), guided=zeros(bool),
      adapter=zeros(jnp.int32), min_tokens=zeros(jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  cache: PagedKVCache
  slots: SlotState
  page_table: jax.Array  # [B, pps] int32, a device copy of the allocator's table


@dataclasses.dataclass
class Prefix:
  """A prefilled prompt: its pages (held, one reference each) and the logits of its next token."""
  tokens: list[int]
  pages: list[int]
  logits: jax.Array  # [V]
  cached_tokens: int  # prompt tokens served from the prefix cache
  prompt_logprobs: list | None = None  # per prompt token after the first: (logprob, top ids, top logprobs)


@dataclasses.dataclass
class StepResult:
  tokens: np.ndarray  # [n, B]
  valid: np.ndarray  # [n, B] bool: a real token of an active slot
  logprob: np.ndarray  # [n, B]
  top_ids: np.ndarray  # [n, B, N]
  top_logprobs: np.ndarray  # [n, B, N]
  rows: np.ndarray | None = None  # [b] the slots this call decoded (its bucket)


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def prefill_bucket(n: int, limit: int) -> int:
  """Compiled prefill length for a piece of `n` tokens: the smallest of 16, 32, 48, 64, 96, 128, 192, ...
  (powers of two and 1.5x them) that holds it, at most `limit` (a power of two). Padding costs as much as real
  tokens (prefill is compute-bound on CPU), so these buckets waste at most 1/3 of a chunk, where powers of two
  alone waste up to 1/2 (a 69-token prompt ran as 128)."""
  p = _next_pow2(max(int(n), 16))
  if p >= 64 and n <= 3 * p // 4:
    p = 3 * p // 4
  return min(p, limit)


def _slot_update(slots: SlotState, slot, row: dict) -> SlotState:
  return dataclasses.replace(slots, **{k: getattr(slots, k).at[slot].set(v) for k, v in row.items()})
