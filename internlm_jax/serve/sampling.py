"""Sampling: per-request parameters (host), the batched sampler (device) and incremental detokenization with
stop strings (host).

Shapes: B slots, V vocab, N top logprobs returned.

Order of logits processing (as vLLM and HF): repetition penalty on every token seen (prompt and output),
presence and frequency penalties on the tokens this request has generated (OpenAI's definition), logit bias,
temperature, top-k, top-p, min-p, then a draw with the request's own key. Temperature 0 is greedy, and sees the
penalties and bias too. The bias comes after the penalties so that OpenAI's -100 / +100 keep meaning "never" /
"always" (vLLM adds it first, where the multiplicative repetition penalty could shrink it). The key of a
request's j-th token is fold_in(key(seed), j): it depends on nothing else in the batch, so a seeded request
gives the same tokens whichever requests run beside it. Reported logprobs are those of the model's own
distribution (log_softmax of the raw logits), which is what scoring harnesses expect.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

MAX_STOP_IDS = 16  # stop token ids per request (a static width on device)
MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs
MAX_LOGIT_BIAS = 300  # OpenAI's cap on logit_bias entries (a static width on device)
MAX_COUNT = 2 ** 15 - 1  # output-token counts are int16 on device and saturate here


class SamplingError(ValueError):
  """A sampling parameter is out of range; `param` names it (for an API's error body)."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What one request asks of generation. `stop_token_ids` None means the tokenizer's defaults (`</s>`,
  `<|im_end|>`); extra ids add to them. `ignore_eos` drops the defaults (benchmarks). `logprobs` N returns
  the chosen token's logprob and the N most likely (0: only the chosen one; None: none). `logit_bias` maps
  token ids to a bias added to their logits (a mapping or (id, bias) pairs; kept as pairs, so that the params
  stay hashable)."""
  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: tuple[tuple[int, float], ...] = ()
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  seed: int | None = None
  logprobs: int | None = None
  prompt_logprobs: int | None = None
  skip_special_tokens: bool = True
  grammar: Any = None  # guided.Grammar (response_format): tokens outside it are masked off
  adapter: int = 0  # the served LoRA adapter (1-based, Engine(adapters=...)); 0: the base model
  min_tokens: int = 0  # stop token ids are masked off until this many tokens were generated (vLLM's min_tokens)

  def __post_init__(self):
    bias = self.logit_bias
    if bias is None or hasattr(bias, "items"):
      bias = (bias or {}).items()
    object.__setattr__(self, "logit_bias", tuple(tuple(p) if isinstance(p, list) else p for p in bias))

  def validate(self, vocab_size: int) -> "SamplingParams":
    def need(ok, message, param=None):
      if not ok:
        raise SamplingError(message, param)
    need(isinstance(self.max_tokens, int) and self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}")
    need(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
         f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}", "min_tokens")
    need(0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}")
    need(self.top_k >= 0 or self.top_k == -1, f"top_k must be >= 0 (0 or -1: off), got {self.top_k}")
    need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
    need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
    need(0.0 < self.repetition_penalty <= 10.0,
         f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
      value = getattr(self, name)
      need(isinstance(value, numbers.Real) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}",
           name)
    bias = self.logit_bias
    need(len(bias) <= MAX_LOGIT_BIAS, f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
    for pair in bias:
      need(isinstance(pair, tuple) and len(pair) == 2, f"logit_bias entries must be (token id, bias), got {pair!r}",
           "logit_bias")
      token, value = pair
      need(isinstance(token, numbers.Integral) and not isinstance(token, bool) and 0 <= token < vocab_size,
           f"logit_bias keys must be token ids in [0, {vocab_size}), got {token!r}", "logit_bias")
      need(isinstance(value, numbers.Real) and -100.0 <= value <= 100.0,
           f"logit_bias values must be in [-100, 100], got {value!r} for token {token}", "logit_bias")
    need(len({int(t) for t, _ in bias}) == len(bias), "logit_bias names a token id more than once", "logit_bias")
    need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
    need(len(self.stop) <= 16, f"at most 16 stop strings, got {len(self.stop)}")
    need(all(0 <= int(t) < vocab_size for t in self.stop_token_ids),
         f"stop_token_ids must be token ids in [0, {vocab_size})")
    need(self.seed is None or 0 <= self.seed < 2 ** 63, f"seed must be a non-negative integer, got {self.seed}")
    for name in ("logprobs", "prompt_logprobs"):
      n = getattr(self, name)
      need(n is None or 0 <= n <= MAX_LOGPROBS, f"{name} must be in [0, {MAX_LOGPROBS}], got {n}")
    return self

  def stop_ids(self, default_ids: Sequence[int]) -> tuple[int, ...]:
    ids = tuple(dict.fromkeys(((() if self.ignore_eos else tuple(default_ids)) + tuple(self.stop_token_ids))))
    if len(ids) > MAX_STOP_IDS:
      raise SamplingError(f"at most {MAX_STOP_IDS} stop token ids, got {len(ids)}")
    return ids


def penalty_rows(params: SamplingParams, generated: Sequence[int], vocab_size: int) -> dict[str, np.ndarray]:
  """One slot's device rows for the presence/frequency penalties and logit bias: output-token counts [V] (from
  `generated`, what a preempted request already produced; zeros for a new one) and the bias as -1 padded ids and
  values [MAX_LOGIT_BIAS]."""
  counts = np.zeros((vocab_size,), np.int16)
  if len(generated) and (params.presence_penalty or params.frequency_penalty):
    counts[:] = np.minimum(np.bincount(np.asarray(generated, np.int64), minlength=vocab_size), MAX_COUNT)
  ids = np.full((MAX_LOGIT_BIAS,), -1, np.int32)
  values = np.zeros((MAX_LOGIT_BIAS,), np.float32)
  for i, (token, bias) in enumerate(params.logit_bias):
    ids[i], values[i] = token, bias
  return dict(presence_penalty=np.float32(params.presence_penalty),
              frequency_penalty=np.float32(params.frequency_penalty), counts=counts, bias_ids=ids, bias_values=values)


# ---- device -----------------------------------------------------------------------------------------------------
def request_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
  """Key of each row's next token: fold_in(key(seed), tokens generated so far). seeds uint32 [B], steps [B]."""
  return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
  """HF's rule on logits [B, V] for tokens in seen [B, V]: divide positive logits by penalty, multiply negative."""
  p = penalty[:, None]
  return jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)


def apply_presence_frequency(logits: jax.Array, counts: jax.Array, presence: jax.Array,
                             frequency: jax.Array) -> jax.Array:
  """OpenAI's (and vLLM's) penalties on logits [B, V]: logits[t] -= presence * (count[t] > 0) + frequency *
  count[t], with count [B, V] the times t is among the row's generated tokens (not the prompt). HF has no such
  processor; its repetition penalty is the multiplicative one above. Rows with neither penalty keep their logits
  bitwise (a batch-mate's penalty must not nudge their rounding)."""
  c = counts.astype(jnp.float32)
  penalised = logits - (presence[:, None] * (c > 0) + frequency[:, None] * c)
  return jnp.where(((presence != 0) | (frequency != 0))[:, None], penalised, logits)


def apply_logit_bias(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
  """Adds values [B, K] to logits [B, V] at token ids [B, K]; id -1 is no entry. A scatter of B x K updates: a
  dense [B, V] bias would cost a full pass (and its copy per slot) for at most 300 tokens a row."""
  B, V = logits.shape
  ids = jnp.where(ids < 0, V, ids)  # past the end: dropped (a negative index would wrap to V - 1)
  return logits.at[jnp.arange(B)[:, None], ids].add(values, mode="drop")


def count_tokens(counts: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
  """counts [B, V] plus one at each row's token [B] where valid [B], saturating at MAX_COUNT (a B-element
  scatter: no pass over the vocabulary)."""
  r = jnp.arange(tokens.shape[0])
  new = jnp.minimum(counts[r, tokens].astype(jnp.int32) + valid, MAX_COUNT)  # int32: no wrap at the cap
  return counts.at[r, tokens].set(new.astype(counts.dtype))


def apply_token_mask(logits: jax.Array, allowed: jax.Array, guided: jax.Array) -> jax.Array:
  """Guided decoding: rows with guided [B] keep only the tokens whose bit is set in allowed [B, W] uint32 (bit
  t % 32 of word t // 32); the rest become -inf. Unguided rows keep their logits bitwise."""
  B, V = logits.shape
  bits = (allowed[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [B, W, 32]
  ok = bits.reshape(B, -1)[:, :V].astype(bool)
  return jnp.where(guided[:, None] & ~ok, -jnp.inf, logits)


def suppress_stop_ids(logits: jax.Array, stop_ids: jax.Array, blocked: jax.Array) -> jax.Array:
  """Rows with blocked [B] get -inf at their stop ids [B, S] (-1 padded): a B x S scatter."""
  B, V = logits.shape
  ids = jnp.where((stop_ids < 0) | ~blocked[:, None], V, stop_ids)  # past the end: dropped
  return logits.at[jnp.arange(B)[:, None], ids].set(-jnp.inf, mode="drop")


def apply_min_tokens(logits: jax.Array, stop_ids: jax.Array, step: jax.Array, min_tokens: jax.Array) -> jax.Array:
  """min_tokens (vLLM's): a row's stop ids [B, S] cannot be sampled before it has produced min_tokens [B] tokens
  (step [B] so far); skipped by cond when no row is that early."""
  early = step < min_tokens
  return jax.lax.cond(jnp.any(early), suppress_stop_ids, lambda x, i, b: x, logits, stop_ids, early)


def _top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks (to -inf) all but each row's top_k logits and then the smallest set whose probability reaches top_p."""
  V = scaled.shape[-1]
  ranked = -jnp.sort(-scaled, axis=-1)  # descending
  rank = jnp.arange(V)[None, :]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
  in_k = rank < k
  probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens: the best is always kept
  keep = in_k & (before < top_p[:, None])
  last = jnp.sum(keep, axis=-1, keepdims=True) - 1
  threshold = jnp.take_along_axis(ranked, last, axis=-1)
  return jnp.where(scaled < threshold, -jnp.inf, scaled)


def argmax(x: jax.Array) -> jax.Array:
  """First index of the maximum along the last axis, as jnp.argmax: a max and a min reduction, which XLA:CPU
  vectorizes (its (value, index) argmax reduction runs ~2x slower over a [32, 32000] batch of logits)."""
  V = x.shape[-1]
  m = jnp.max(x, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(x == m, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first, V - 1)  # a NaN row (no element equals its max) -> the last id


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           min_p: jax.Array, repetition_penalty: jax.Array, seen: jax.Array, *,
           presence_penalty: jax.Array | None = None, frequency_penalty: jax.Array | None = None,
           counts: jax.Array | None = None, bias_ids: jax.Array | None = None,
           bias_values: jax.Array | None = None, allowed: jax.Array | None = None,
           guided: jax.Array | None = None) -> jax.Array:
  """Next token [B] int32 from logits [B, V] float32 with per-row parameters [B] and keys [B]; the presence /
  frequency penalties need counts [B, V], the bias ids and values [B, K] (see apply_logit_bias), guided
  decoding the token bitmask allowed [B, W] and guided [B] (see apply_token_mask)."""
  chex.assert_rank(logits, 2)
  B = logits.shape[0]
  chex.assert_shape([temperature, top_k, top_p, min_p, repetition_penalty], (B,))
  # Each is a [B, V] pass (the bias a scatter) skipped when no row asks for it (the usual case).
  logits = jax.lax.cond(jnp.any(repetition_penalty != 1.0), apply_repetition_penalty, lambda x, s, p: x,
                        logits, seen, repetition_penalty)
  if counts is not None:
    chex.assert_shape([presence_penalty, frequency_penalty], (B,))
    logits = jax.lax.cond(jnp.any((presence_penalty != 0) | (frequency_penalty != 0)), apply_presence_frequency,
                          lambda x, c, p, f: x, logits, counts, presence_penalty, frequency_penalty)
  if bias_ids is not None:
    logits = jax.lax.cond(jnp.any(bias_ids >= 0), apply_logit_bias, lambda x, i, v: x, logits, bias_ids,
                          bias_values)
  if allowed is not None:  # last, so that no penalty or bias can lift a masked token off -inf
    logits = jax.lax.cond(jnp.any(guided), apply_token_mask, lambda x, a, g: x, logits, allowed, guided)
  greedy = temperature <= 0.0
  best = argmax(logits)

  def draw():
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    # The sort costs O(V log V) per row: skip it when no row filters by top-k or top-p.
    needs_sort = jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0)))
    scaled = jax.lax.cond(needs_sort, _top_k_top_p, lambda s, k, p: s, scaled, top_k, top_p)
    probs = jax.nn.softmax(scaled, axis=-1)
    scaled = jnp.where(probs < min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, scaled)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

  # The draw (B x V Gumbel noise) costs more than the decode step's attention: skip it when every row is greedy.
  drawn = jax.lax.cond(jnp.all(greedy), lambda: best, draw)
  return jnp.where(greedy, best, drawn)


def log_normalizer(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max [B, 1], log sum exp(logits - max) [B, 1]) of logits [B, V]: log_softmax = (logits - max) - second,
  as jax.nn.log_softmax computes it, without writing the [B, V] result."""
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  return top, jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))


def chosen_logprobs(logits: jax.Array, tokens: jax.Array, want_top: jax.Array, top_n: int):
  """(logprob of tokens [B], top ids [B, N], top logprobs [B, N]) under log_softmax(logits [B, V]); the top-N
  search over the vocabulary runs only when some row's want_top [B] is set (zeros otherwise)."""
  top, log_sum = log_normalizer(logits)
  chosen = (jnp.take_along_axis(logits, tokens[:, None], axis=-1) - top) - log_sum
  B = logits.shape[0]

  def search():
    values, ids = jax.lax.top_k(logits, top_n)  # log_softmax keeps each row's order
    return (values - top) - log_sum, ids.astype(jnp.int32)

  top_lp, top_ids = jax.lax.cond(jnp.any(want_top), search,
                                 lambda: (jnp.zeros((B, top_n), jnp.float32), jnp.zeros((B, top_n), jnp.int32)))
  return chosen[:, 0], top_ids, top_lp


def token_logprobs(logits: jax.Array, tokens: jax.Array, top_n: int):
  """(logprob of tokens [B], top ids [B, N], top logprobs [B, N]) under log_softmax(logits [B, V])."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(logprobs, top_n)
  return chosen, top_ids.astype(jnp.int32), top_lp


# ---- host: text and stop strings ------------------------------------------------------------------------------
class TextStream:
  """Turns generated ids into text deltas, stopping at the first stop string.

  Decoding a growing id list piecewise can split a multi-byte character or change a piece's leading space, so
  each step decodes a short window (from the last fully released id) and releases only the new, complete part.
  Text that could be the start of a stop string is held back until it is known not to be one.
  """

  def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
    self._tok = tokenizer
    self._stop = tuple(stop)
    self._skip = skip_special_tokens
    self._ids: list[int] = []
    self._prefix = 0  # window start in ids
    self._read = 0  # ids[:read] are fully in self.text
    self.text = ""  # decoded so far (cut at a stop string once one is found)
    self._released = 0
    self.stopped = False

  def _decode(self, ids):
    # A model vocabulary padded past the tokenizer's has ids with no text: they decode to nothing.
    size = self._tok.vocab_size
    return self._tok.decode([i for i in ids if i < size], skip_special_tokens=self._skip)

  def append(self, token_ids: Sequence[int]) -> str:
    """Adds ids and returns the newly releasable text ('' while held back)."""
    if self.stopped:
      return ""
    self._ids.extend(int(t) for t in token_ids)
    window = self._decode(self._ids[self._prefix:])
    # An incomplete multi-byte character: wait for its other bytes, but no longer than a UTF-8 character can
    # span (4 byte-fallback ids), so a model that emits invalid bytes cannot stall the stream.
    if window.endswith("\ufffd") and len(self._ids) - self._read < 4:
      return self._release(final=False)
    self._commit(window)
    return self._release(final=self.stopped)

  def finish(self) -> str:
    """The held-back tail once generation has ended (undecodable bytes come out as U+FFFD)."""
    if not self.stopped and self._read < len(self._ids):
      self._commit(self._decode(self._ids[self._prefix:]))
    return self._release(final=True)

  def _commit(self, window: str) -> None:
    before = self._decode(self._ids[self._prefix:self._read])
    search_from = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
    self.text += window[len(before):]
    self._prefix, self._read = self._read, len(self._ids)
    for s in self._stop:
      at = self.text.find(s, search_from)
      if at >= 0:
        self.text = self.text[:at]
        self.stopped = True

  def _release(self, final: bool) -> str:
    end = len(self.text)
    if not final:
      for s in self._stop:  # keep back any tail that is a proper prefix of a stop string
        for n in range(min(len(s) - 1, end - self._released), 0, -1):
          if self.text.endswith(s[:n]):
            end = min(end, len(self.text) - n)
            break
    out = self.text[self._released:end]
    self._released = max(self._released, end)
    return out
