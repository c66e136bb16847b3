"""The serving engine on JetStream's contract: prefill -> Prefix, insert(prefix, state, slot), generate(state),
free(state, slot). The paged cache lives on device; the page allocator and page tables live on the host.

Shapes: B slots, b decoded rows (a bucket), V vocab, n steps per generate call, N top logprobs, pps pages per
sequence.
  DecodeState.slots: per-slot rows [B] (and logits, seen, counts [B, V], stop_ids [B, MAX_STOP_IDS], bias_ids and
  bias_values [B, MAX_LOGIT_BIAS], the guided-decoding bitmask allowed [B, W], W = ceil(V / 32))
  StepResult: tokens, valid, logprob [n, B]; top_ids, top_logprobs [n, B, N]

A generate call runs up to n decode steps in one device loop: each step samples every active slot's next token from the
logits it holds, feeds the token through the model (writing its key/value) and keeps the new logits. A slot stops
on a stop token id or when its token budget runs out, on device, so the host only has to reserve pages for n more
tokens per slot before the call. Stop strings are the host's job (the scheduler frees the slot). With
`halt_on_finish` (a traced flag: no extra compile) the call ends after the first step in which a slot finishes, so
a waiting request takes its slot at once instead of after up to n - 1 idle steps (the scheduler sets it while
requests wait); the result then holds only the steps that ran. `max_steps` (traced too) caps a call's steps: a
guided slot (guided.py) needs a new token mask from the host after every token.

A call decodes only a bucket of b slots, the smallest power of two (at least min_decode_bucket, at most B)
covering the slots that may be active: their rows are gathered, run, and scattered back. A decode step's cost
grows with its rows (bench model, 2 cores: 30 ms at 1 row, 37 ms at 8, 53 at 16, 88 at 32), so a half-empty
batch no longer pays for the empty half. Why a minimum: XLA:CPU runs a dot of few rows with another kernel whose
float rounding differs (measured: rows are bitwise equal for every b >= 6 on the bench model, >= 16 on the tiny
test model, and differ by ~1e-6 below), so buckets at or above that size keep a request's outputs independent of
what runs beside it. The buckets add at most log2(B) + 1 compiled shapes per page-table width (`warmup`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.serve import adapters as adapters_lib
from internlm_jax.serve import paged_model, sampling
from internlm_jax.serve.kv_cache import (CacheFullError, PageAllocator, RequestTooLargeError,
                                         init_paged_cache, page_hashes, pages_for_budget)
from internlm_jax.serve.engine_state import (DecodeState, EngineConfig, Prefix, StepResult, _next_pow2,
                                             _slot_update, empty_slots, prefill_bucket)
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules


class Engine:
  """Owns params, the paged cache pool and the page allocator; all methods run on one (scheduler) thread."""

  def __init__(self, params: dict[str, Any], config: ModelConfig, engine_config: EngineConfig = EngineConfig(),
               *, mesh=None, rules: ShardingRules = DEFAULT_RULES, adapters: Sequence[tuple[Any, dict]] = ()):
    """`adapters`: (LoraConfig, adapter tree) pairs (lora_io.load_adapter) served beside the base; a request picks
    adapter j (1-based; 0 the base) by SamplingParams.adapter (adapters.py)."""
    ec = engine_config
    self.config, self.ec, self.mesh = config, ec, mesh
    self.rules = rules
    self.max_seq_len = int(ec.max_seq_len or config.max_position_embeddings)
    self.pages_per_seq = -(-self.max_seq_len // ec.page_size)
    if ec.num_pages is not None:
      num_pages = ec.num_pages
    elif ec.kv_budget_bytes is not None:
      num_pages = pages_for_budget(config, ec.kv_budget_bytes, ec.page_size, ec.kv_dtype)
    else:  # every slot can hold a full-length sequence
      num_pages = ec.max_slots * self.pages_per_seq + 1
    if ec.min_decode_bucket < 1:
      raise ValueError(f"min_decode_bucket must be >= 1, got {ec.min_decode_bucket}")
    if ec.prefill_chunk & (ec.prefill_chunk - 1) or ec.prefill_chunk < 16:
      raise ValueError(f"prefill_chunk must be a power of two >= 16, got {ec.prefill_chunk}")
    self.use_kernel = (jax.default_backend() in ("gpu", "tpu") if ec.attention_kernel is None
                       else ec.attention_kernel)
    # Per-layer, [out, in] weights (paged_model.serving_params), placed on the mesh; the stacked params are not
    # kept, so the engine holds one copy of the weights.
    self.params = paged_model.serving_params(params, config, mesh, rules)
    # Calls with no adapter row run on the weights without the adapter stacks (no products computed for nothing;
    # a second compiled variant, the same arrays).
    self._base_params, self.num_adapters = self.params, len(adapters)
    self._slot_adapter = np.zeros((ec.max_slots,), np.int32)  # host copy of slots.adapter
    if adapters:
      self.params = adapters_lib.with_adapters(self.params, config, adapters, mesh)
    self.allocator = PageAllocator(num_pages, ec.page_size, ec.max_slots, self.pages_per_seq, ec.prefix_caching)
    self._uploaded_version = -1
    # Slots that may be active on device: inserted with tokens to produce and not yet seen to stop or freed.
    self._live = np.zeros((ec.max_slots,), bool)
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("top_n",), donate_argnums=(1,))
    self._generate = jax.jit(self._generate_fn, static_argnames=("steps", "width"), donate_argnums=(1,))
    self._insert = jax.jit(_slot_update, donate_argnums=(0,))
    self._set_allowed = jax.jit(lambda slots, allowed: dataclasses.replace(slots, allowed=allowed),
                                donate_argnums=(0,))
    self.mask_words = -(-config.vocab_size // 32)  # W: the guided-decoding bitmask's uint32 words per slot
    self._allowed = np.full((ec.max_slots, self.mask_words), 0xFFFFFFFF, np.uint32)  # host copy of slots.allowed

  # ---- jitted bodies ----------------------------------------------------------------------------------------
  def _ctx(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _prefill_fn(self, params, cache, tokens, targets, start, n_valid, table, adapter, *, top_n):
    adapter = adapter if self.num_adapters else None
    if top_n is None:  # only the last token's logits: the output head runs on that position alone
      logits, cache = paged_model.prefill_chunk(params, cache, tokens, start, n_valid, table, config=self.config,
                                                rules=self.rules, head_at=n_valid - 1, adapter_id=adapter)
      return cache, logits[0, 0], None
    logits, cache = paged_model.prefill_chunk(params, cache, tokens, start, n_valid, table, config=self.config,
                                              rules=self.rules, adapter_id=adapter)
    logits = logits[0]  # [C, V]
    last = jnp.take(logits, n_valid - 1, axis=0)
    return cache, last, sampling.token_logprobs(logits, targets, max(top_n, 1))

  def _generate_fn(self, params, state: DecodeState, rows, halt_on_finish, max_steps, *, steps, width):
    # Only the bucket's rows [b] (distinct slots) are decoded. Attention reads only the first `width` pages of
    # each slot: enough for every active slot's tokens.
    table = state.page_table[rows, :width]
    bucket = jax.tree.map(lambda x: x[rows], state.slots)

    def step(carry, _):
      cache, s = carry
      keys = sampling.request_keys(s.seed, s.step)
      logits = s.logits
      if self.ec.sample_vocab is not None and self.ec.sample_vocab < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < self.ec.sample_vocab, logits, -jnp.inf)
      logits = sampling.apply_min_tokens(logits, s.stop_ids, s.step, s.min_tokens)
      token = sampling.sample(logits, keys, s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty,
                              s.seen, presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                              counts=s.counts, bias_ids=s.bias_ids, bias_values=s.bias_values,
                              allowed=s.allowed, guided=s.guided)
      valid = s.active & (s.remaining > 0)
      token = jnp.where(valid, token, 0)
      logprob, top_ids, top_lp = sampling.chosen_logprobs(s.logits, token, s.want_top & valid,
                                                          sampling.MAX_LOGPROBS)
      logits, cache = paged_model.decode_step(params, cache, token, s.lengths, table, valid,
                                              config=self.config, rules=self.rules, mesh=self.mesh,
                                              use_kernel=self.use_kernel,
                                              adapter_ids=s.adapter if self.num_adapters else None)
      stopped = jnp.any(token[:, None] == s.stop_ids, axis=-1)
      r = jnp.arange(token.shape[0])
      inc = valid.astype(jnp.int32)
      s = dataclasses.replace(
          s, logits=jnp.where(valid[:, None], logits, s.logits), lengths=s.lengths + inc,
          remaining=s.remaining - inc, step=s.step + inc, active=valid & ~stopped & (s.remaining > 1),
          seen=s.seen.at[r, token].set(s.seen[r, token] | valid), counts=sampling.count_tokens(s.counts, token, valid))
      return (cache, s), (token, valid, logprob, top_ids, top_lp)

    # A while loop rather than a scan so that it can stop early; its output buffers are filled a step at a time.
    one = jax.eval_shape(step, (state.cache, bucket), None)[1]
    empty = tuple(jnp.zeros((steps,) + x.shape, x.dtype) for x in one)

    def keep_going(carry):
      i, halted = carry[:2]
      return (i < jnp.minimum(steps, max_steps)) & ~halted

    def body(carry):
      i, _, cache, s, outs = carry
      (cache, s_next), out = step((cache, s), None)
      finished = out[1] & ~s_next.active  # valid this step, inactive now: a stop token or the budget spent
      outs = tuple(buf.at[i].set(x) for buf, x in zip(outs, out))
      return i + 1, halt_on_finish & jnp.any(finished), cache, s_next, outs

    ran, _, cache, bucket, out = jax.lax.while_loop(
        keep_going, body, (jnp.int32(0), jnp.bool_(False), state.cache, bucket, empty))
    slots = jax.tree.map(lambda full, part: full.at[rows].set(part), state.slots, bucket)
    return DecodeState(cache, slots, state.page_table), out + (bucket.active, ran)

  # ---- state ------------------------------------------------------------------------------------------------
  def init_state(self) -> DecodeState:
    """A new decode state over an empty KV cache. The allocator starts over with it: pages that cached prefixes
    (or slots of an earlier state) point at hold nothing here, and a prefix hit on one would read zeros."""
    c, B = self.config, self.ec.max_slots
    for slot in range(B):
      if self.allocator.slot_pages[slot]:
        self.allocator.free_slot(slot)
    self.allocator.clear_prefix_cache()
    with self._ctx():
      cache = init_paged_cache(c, self.allocator.num_pages, self.ec.page_size, self.ec.kv_dtype, mesh=self.mesh,
                               rules=self.rules)
    slots = empty_slots(B, self.config.vocab_size, self.mask_words)
    self._uploaded_version = self.allocator.version
    self._live[:] = False
    self._allowed[:], self._slot_adapter[:] = 0xFFFFFFFF, 0
    return DecodeState(cache, slots, jnp.array(self.allocator.page_table, copy=True))

  def _sync_table(self, state: DecodeState) -> DecodeState:
    if self._uploaded_version == self.allocator.version:
      return state
    self._uploaded_version = self.allocator.version
    # A copy: the host table keeps changing while the device may still be reading this one.
    return dataclasses.replace(state, page_table=jnp.array(self.allocator.page_table, copy=True))

  @property
  def max_request_tokens(self) -> int:
    """Longest prompt + output one request can have: the context length, or less when the pool is smaller."""
    return min(self.max_seq_len, self.allocator.max_tokens_per_seq)

  # ---- JetStream contract -----------------------------------------------------------------------------------
  def check_request(self, prompt: Sequence[int], max_tokens: int, adapter: int = 0) -> None:
    """Raises RequestTooLargeError when a request can never be served: empty prompt, ids outside the vocabulary,
    prompt + output past the context length or past what the page pool can hold for one sequence, an adapter
    this engine does not hold."""
    if len(prompt) == 0:
      raise RequestTooLargeError("the prompt is empty")
    if not 0 <= int(adapter) <= self.num_adapters:
      raise RequestTooLargeError(f"adapter {adapter} is not served (this engine holds {self.num_adapters})")
    V = self.config.vocab_size
    if any(not 0 <= int(t) < V for t in prompt):
      raise RequestTooLargeError(f"prompt token ids must lie in [0, {V})")
    total = len(prompt) + max(max_tokens, 1)
    if total > self.max_seq_len:
      raise RequestTooLargeError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                                 f"the context length {self.max_seq_len}")
    self.allocator.check_fits(total)

  def prefill(self, state: DecodeState, tokens: Sequence[int], *, prompt_logprobs: int | None = None,
              adapter: int = 0) -> tuple[DecodeState, Prefix]:
    """Writes the prompt's keys/values into newly taken pages (reusing cached prefix pages) -> Prefix. `adapter`:
    the LoRA adapter the sequence runs with (0: the base); cached pages are shared only under the same one.

    Long prompts run in chunks of at most `prefill_chunk` tokens. With `prompt_logprobs` N every prompt token
    after the first is scored (so no prefix-cache hit is used). CacheFullError when the pool is short now.
    """
    tokens = [int(t) for t in tokens]
    T, ps, alloc = len(tokens), self.ec.page_size, self.allocator
    if T == 0:
      raise RequestTooLargeError("the prompt is empty")
    if any(not 0 <= t < self.config.vocab_size for t in tokens):
      raise RequestTooLargeError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
    alloc.check_fits(T + 1)
    if not 0 <= adapter <= self.num_adapters:
      raise RequestTooLargeError(f"adapter {adapter} is not served (0..{self.num_adapters})")
    hashes = page_hashes(tokens, ps, salt=adapter)
    # At least the last prompt token is always computed: its logits give the first output token.
    shared = [] if prompt_logprobs is not None else alloc.match_prefix(hashes, (T - 1) // ps)
    try:
      fresh = alloc.allocate(alloc.pages_for(T) - len(shared))
    except CacheFullError:
      alloc.release(shared)
      raise
    pages = shared + fresh
    cache, start, scored = state.cache, len(shared) * ps, []
    try:
      while start < T:
        n = min(self.ec.prefill_chunk, T - start)
        C = prefill_bucket(n, self.ec.prefill_chunk)
        ctx = min(_next_pow2(alloc.pages_for(start + C)), self.pages_per_seq)
        chunk = np.full((1, C), self.config.pad_token_id, np.int32)
        chunk[0, :n] = tokens[start:start + n]
        targets = np.zeros((C,), np.int32)
        following = tokens[start + 1:start + n + 1]
        targets[:len(following)] = following
        table = np.zeros((ctx,), np.int32)
        table[:min(len(pages), ctx)] = pages[:ctx]
        with self._ctx():
          cache, last, lp = self._prefill(self.params if adapter else self._base_params, cache,
                                          jnp.asarray(chunk), jnp.asarray(targets),
                                          jnp.int32(start), jnp.int32(n), jnp.asarray(table), jnp.int32(adapter),
                                          top_n=prompt_logprobs)
        if lp is not None:
          lp = jax.device_get(lp)
          scored += [(float(lp[0][i]), lp[1][i, :prompt_logprobs].tolist(), lp[2][i, :prompt_logprobs].tolist())
                     for i in range(len(following))]
        start += n
    except BaseException:
      alloc.release(pages)
      raise
    finally:
      state = dataclasses.replace(state, cache=cache)
    for i in range(len(shared), T // ps):
      alloc.register(pages[i], hashes[i])
    return state, Prefix(tokens, pages, last, len(shared) * ps, scored if prompt_logprobs is not None else None)

  def release(self, prefix: Prefix) -> None:
    """Gives back a prefix's pages when it will not be inserted."""
    self.allocator.release(prefix.pages)
    prefix.pages = []

  def insert(self, prefix: Prefix, state: DecodeState, slot: int, params: sampling.SamplingParams,
             stop_ids: Sequence[int], *, seed: int, generated: Sequence[int] = (),
             allowed: np.ndarray | None = None) -> DecodeState:
    """Moves a prefix into an empty slot with its sampling parameters. `generated` (tokens a preempted request
    already produced, now part of the prefix) keeps its sampling key sequence and token budget going. `allowed`
    [W] uint32: a guided slot's token bitmask for its first token (set_allowed updates it)."""
    B, V = self.ec.max_slots, self.config.vocab_size
    if not 0 <= slot < B:
      raise ValueError(f"slot {slot} out of range [0, {B})")
    chex.assert_shape(prefix.logits, (V,))
    self.allocator.assign(slot, prefix.pages, len(prefix.tokens))
    seen = np.zeros((V,), bool)
    if params.repetition_penalty != 1.0:
      seen[np.asarray(prefix.tokens, np.int64)] = True
    stop_row = np.full((sampling.MAX_STOP_IDS,), -1, np.int32)
    stop_row[:len(stop_ids)] = stop_ids
    top_k = 0 if params.top_k < 0 else params.top_k
    # Fixed numpy dtypes, so a Python int where a float is expected does not retrace the update.
    row = dict(logits=prefix.logits, lengths=np.int32(len(prefix.tokens)),
               active=np.bool_(params.max_tokens > len(generated)),
               remaining=np.int32(params.max_tokens - len(generated)), step=np.int32(len(generated)),
               seed=np.uint32(seed % 2 ** 32), temperature=np.float32(params.temperature), top_k=np.int32(top_k),
               top_p=np.float32(params.top_p), min_p=np.float32(params.min_p),
               repetition_penalty=np.float32(params.repetition_penalty), want_top=np.bool_(bool(params.logprobs)),
               seen=seen, stop_ids=stop_row, guided=np.bool_(allowed is not None), adapter=np.int32(params.adapter),
               min_tokens=np.int32(params.min_tokens),
               allowed=(np.full((self.mask_words,), 0xFFFFFFFF, np.uint32) if allowed is None
                        else np.asarray(allowed, np.uint32).reshape(self.mask_words)),
               **sampling.penalty_rows(params, generated, V))
    prefix.pages = []  # the slot owns them now
    self._live[slot] = bool(row["active"])
    self._allowed[slot] = row["allowed"]
    self._slot_adapter[slot] = params.adapter
    with self._ctx():
      slots = self._insert(state.slots, jnp.int32(slot), row)
    return dataclasses.replace(state, slots=slots)

  def reserve(self, slot: int, num_tokens: int) -> None:
    """Pages for `num_tokens` more tokens in `slot` before a generate call (CacheFullError if short)."""
    self.allocator.reserve(slot, int(self.allocator.lengths[slot]) + num_tokens)

  def generate(self, state: DecodeState, steps: int | None = None, halt_on_finish: bool = False,
               max_steps: int | None = None) -> tuple[DecodeState, StepResult]:
    """`steps` (default steps_per_call) decode steps for every active slot, one device-to-host copy; with
    `halt_on_finish`, fewer: it stops after the first step in which a slot finishes; with `max_steps`, at most
    that many (no new compile). The result's n is the steps that ran."""
    steps = steps or self.ec.steps_per_call
    B = self.ec.max_slots
    state = self._sync_table(state)
    live = np.flatnonzero(self._live)
    rows = self._bucket_rows(live)
    # Page-table width: a power of two covering the longest slot after `steps` more tokens (few compiled shapes).
    longest = int(self.allocator.lengths[live].max(initial=0)) + steps
    width = min(_next_pow2(self.allocator.pages_for(longest)), self.pages_per_seq)
    with self._ctx():
      params = self.params if self._slot_adapter[live].any() else self._base_params
      state, out = self._generate(params, state, jnp.asarray(rows), np.bool_(halt_on_finish),
                                  np.int32(max_steps or steps), steps=steps, width=width)
    *out, active, ran = jax.device_get(out)
    self._live[rows] = active
    full = [np.zeros((int(ran), B) + x.shape[2:], x.dtype) for x in out]  # slot columns [n, B, ...]
    for x, y in zip(out, full):  # the bucket's columns; slots outside it are idle
      y[:, rows] = x[:int(ran)]
    tokens, valid, logprob, top_ids, top_lp = full
    self.allocator.lengths += valid.sum(axis=0).astype(np.int32)
    return state, StepResult(tokens, valid, logprob, top_ids, top_lp, rows)

  def _bucket_rows(self, live: np.ndarray) -> np.ndarray:
    """The live slots, padded with idle ones to the bucket size (distinct, so the scatter back is exact)."""
    B = self.ec.max_slots
    size = min(max(_next_pow2(len(live)), self.ec.min_decode_bucket), B)
    idle = np.flatnonzero(~np.isin(np.arange(B), live))[:size - len(live)]
    return np.concatenate([live, idle]).astype(np.int32)

  def warmup(self, state: DecodeState, widths: Sequence[int] | None = None,
             steps: int | None = None) -> DecodeState:
    """Compiles every decode bucket at each page-table width (default all powers of two up to pages_per_seq), so
    no request pays a compile mid-run. Needs every slot idle; the calls change nothing but the scratch page."""
    if self._live.any():
      raise ValueError("warmup needs every slot idle")
    steps = steps or self.ec.steps_per_call
    B = self.ec.max_slots
    if widths is None:
      widths = sorted({min(1 << i, self.pages_per_seq) for i in range(self.pages_per_seq.bit_length() + 1)})
    buckets = sorted({self._bucket_rows(np.arange(n)).size for n in range(1, B + 1)})
    state = self._sync_table(state)
    with self._ctx():
      for params in {id(p): p for p in (self._base_params, self.params)}.values():
        for width in widths:
          for b in buckets:
            state, out = self._generate(params, state, jnp.arange(b, dtype=jnp.int32), np.bool_(False),
                                        np.int32(steps), steps=steps, width=width)
    jax.block_until_ready(out)
    return state

  def free(self, state: DecodeState, slot: int) -> DecodeState:
    """Ends a slot's sequence: its pages go back to the pool at once and it stops decoding."""
    self.allocator.free_slot(slot)
    self._live[slot] = False
    self._slot_adapter[slot] = 0
    # The penalties and bias go back to "off" too: an idle slot still pads decode buckets, and a stale row would
    # keep their [b, V] passes (skipped by cond when no row asks) running for every later call.
    off = dict(active=np.bool_(False), remaining=np.int32(0), repetition_penalty=np.float32(1.0),
               presence_penalty=np.float32(0.0), frequency_penalty=np.float32(0.0),
               bias_ids=np.full((sampling.MAX_LOGIT_BIAS,), -1, np.int32), guided=np.bool_(False),
               min_tokens=np.int32(0))
    with self._ctx():
      slots = self._insert(state.slots, jnp.int32(slot), off)
    return dataclasses.replace(state, slots=slots)

  def set_allowed(self, state: DecodeState, masks: dict[int, np.ndarray]) -> DecodeState:
    """New token bitmasks [W] for guided slots (after the host's grammar consumed their tokens), in one upload;
    the other slots' rows are left as they are."""
    if not masks:
      return state
    for slot, mask in masks.items():
      self._allowed[slot] = mask
    with self._ctx():
      slots = self._set_allowed(state.slots, self._allowed.copy())
    return dataclasses.replace(state, slots=slots)


__all__ = ["CacheFullError", "DecodeState", "Engine", "EngineConfig", "Prefix", "RequestTooLargeError",
           "StepResult", "prefill_bucket"]
