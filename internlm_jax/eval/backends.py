"""What the evaluator asks of a model, and the in-process implementation over our params.

Every inferencer talks to a `Backend`: text generation (plain or chat), and log-likelihood of token continuations.
Text-level helpers (`loglikelihood`, `rolling_loglikelihood`) tokenize on the client side and call the token-level
method, as lm-eval does, so two backends that share a tokenizer score exactly the same tokens: the in-process
backend here and the OpenAI-compatible client in `openai_backend.py`.

Conventions (also what the HTTP backend sends): every scored or generated sequence starts with `<s>`; a
continuation is tokenized on its own and appended to the tokenized context (lm-eval moves trailing spaces of
the context to the continuation first); sequences longer than `max_length` lose tokens from the left.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.generate import _generate
from internlm_jax.model import forward
from internlm_jax.tokenizer import Tokenizer

Messages = list[dict[str, Any]]
TokenRequest = tuple[list[int], list[int]]  # (context ids, continuation ids)


class BackendError(RuntimeError):
  """The model backend failed (bad request, server error after retries, unsupported operation)."""


class Backend(Protocol):
  name: str  # the model column of the summary table
  fingerprint: str  # changes when the weights change: keys the per-sample cache
  max_length: int  # context window in tokens
  tokenizer: Tokenizer | None

  def generate(self, prompts: list[str], *, max_tokens: int, stop: Sequence[str] = (),
               temperature: float = 0.0, seed: int = 0) -> list[str]: ...

  def chat(self, conversations: list[Messages], *, max_tokens: int, stop: Sequence[str] = (),
           temperature: float = 0.0, seed: int = 0) -> list[str]: ...

  def loglikelihood_tokens(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """Text before the first stop string (the stop string itself is not part of the answer)."""
  cut = len(text)
  for s in stop:
    if s:
      i = text.find(s)
      if 0 <= i < cut:
        cut = i
  return text[:cut]


def split_request(context: str, continuation: str) -> tuple[str, str]:
  """lm-eval's rule: trailing spaces of the context belong to the continuation ("Answer:" + " B")."""
  stripped = context.rstrip(" ")
  return stripped, context[len(stripped):] + continuation


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> TokenRequest:
  if not continuation:
    raise BackendError("a log-likelihood request needs a non-empty continuation")
  context, continuation = split_request(context, continuation)
  ctx = [tokenizer.bos_id] + (tokenizer.encode(context) if context else [])
  cont = tokenizer.encode(continuation)
  if not cont:
    raise BackendError(f"continuation {continuation!r} encodes to no tokens")
  return ctx, cont


def loglikelihood(backend: Backend, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
  """(sum of log-probabilities of the continuation given the context, whether greedy decoding produces it)."""
  tok = _need_tokenizer(backend)
  return backend.loglikelihood_tokens([encode_pair(tok, c, x) for c, x in requests])


def rolling_windows(ids: list[int], bos: int, max_length: int, stride: int | None = None) -> list[TokenRequest]:
  """Requests scoring every token of `ids` once: the first window is conditioned on `<s>`, each next one on up
  to `max_length - stride` preceding tokens (a sliding window; stride defaults to half the window)."""
  if max_length < 2:
    raise BackendError(f"max_length must be at least 2, got {max_length}")
  stride = stride or max(1, max_length // 2)
  stride = min(stride, max_length - 1)
  first = min(len(ids), max_length - 1)
  out = [([bos], ids[:first])]
  pos = first
  while pos < len(ids):
    end = min(len(ids), pos + stride)
    ctx_start = max(0, end - max_length)
    out.append((ids[ctx_start:pos], ids[pos:end]))
    pos = end
  return out


def rolling_loglikelihood(backend: Backend, texts: list[str], stride: int | None = None
                          ) -> list[tuple[float, int]]:
  """(sum of log-probabilities of every token of each text, token count): perplexity's numerator and
  denominator. Texts longer than the window are scored in overlapping windows."""
  tok = _need_tokenizer(backend)
  flat, owners, counts = [], [], []
  for i, text in enumerate(texts):
    ids = tok.encode(text)
    if not ids:
      raise BackendError(f"text {i} encodes to no tokens")
    counts.append(len(ids))
    for req in rolling_windows(ids, tok.bos_id, backend.max_length, stride):
      flat.append(req)
      owners.append(i)
  scores = backend.loglikelihood_tokens(flat)
  sums = [0.0] * len(texts)
  for owner, (lp, _) in zip(owners, scores):
    sums[owner] += lp
  return list(zip(sums, counts))


def _need_tokenizer(backend: Backend) -> Tokenizer:
  if backend.tokenizer is None:
    raise BackendError(f"backend {backend.name!r} has no tokenizer; log-likelihood requests are tokenized on "
                       "the client (pass --tokenizer=PATH)")
  return backend.tokenizer


def _bucket(n: int, cap: int) -> int:
  """Padded width: powers of two from 16, so a whole evaluation compiles a handful of shapes."""
  width = 16
  while width < n:
    width *= 2
  return max(n, min(width, cap))


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params, tokens, targets, *, config: ModelConfig):
  """Per position: log p(target), and the argmax token with its log-probability. All [B, T]."""
  logp = jax.nn.log_softmax(forward(params, tokens, config), axis=-1)
  target_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  top = jnp.argmax(logp, axis=-1).astype(jnp.int32)
  top_lp = jnp.take_along_axis(logp, top[..., None], axis=-1)[..., 0]
  return target_lp, top, top_lp


def params_fingerprint(params) -> str:
  """A short hash of the weights (shape plus two moments per leaf): identical weights, identical key."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = jnp.asarray(leaf, jnp.float32)
    stats = np.asarray(jax.device_get(jnp.stack([jnp.sum(leaf), jnp.sum(jnp.abs(leaf))])), np.float64)
    digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{stats[0]:.9e}{stats[1]:.9e}".encode())
  return digest.hexdigest()[:12]


class InProcessBackend:
  """Our params on this host's devices: `generate.py`'s dense-cache decoding and `model.forward` for scoring.

  Requests are sorted by length and padded to a few bucketed shapes with a fixed batch size, so evaluating a
  dataset compiles a handful of programs. (The serving engine can replace `_generate` later without changing
  the interface.)"""

  def __init__(self, params, config: ModelConfig, tokenizer: Tokenizer, *, name: str = "model",
               batch_size: int = 8, max_length: int | None = None, fingerprint: str | None = None):
    if tokenizer.vocab_size > config.vocab_size:
      raise BackendError(f"tokenizer has {tokenizer.vocab_size} pieces but the model only {config.vocab_size}")
    self.params, self.config, self.tokenizer = params, config, tokenizer
    self.name, self.batch_size = name, int(batch_size)
    self.max_length = int(max_length or config.max_position_embeddings)
    self.fingerprint = fingerprint or params_fingerprint(params)

  # ---- generation ------------------------------------------------------------------------------------------
  def generate(self, prompts: list[str], *, max_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0,
               seed: int = 0) -> list[str]:
    ids = [[self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in prompts]
    return [cut_at_stop(t, stop) for t in self.generate_ids(ids, max_tokens, temperature, seed)]

  def chat(self, conversations: list[Messages], *, max_tokens: int, stop: Sequence[str] = (),
           temperature: float = 0.0, seed: int = 0) -> list[str]:
    ids = [self.tokenizer.encode_chat(m) for m in conversations]
    return [cut_at_stop(t, stop) for t in self.generate_ids(ids, max_tokens, temperature, seed)]

  def generate_ids(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                   seed: int = 0) -> list[str]:
    """Decoded continuations (without the stop token) of token-id prompts, in input order."""
    vocab = self.tokenizer.vocab_size
    # Ids past the tokenizer (a model whose vocabulary is padded) have no text.
    return [self.tokenizer.decode([t for t in ids if t < vocab], skip_special_tokens=True)
            for ids in self.generate_tokens(prompts, max_tokens, temperature, seed)]

  def generate_tokens(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                      seed: int = 0) -> list[list[int]]:
    """New token ids of each prompt, cut before the first stop token. Prompts longer than the window keep
    their end (where the question is)."""
    if max_tokens <= 0:
      return [[] for _ in prompts]
    budget = self.max_length - max_tokens
    if budget < 1:
      raise BackendError(f"max_tokens={max_tokens} leaves no room for a prompt in max_length={self.max_length}")
    prompts = [p[-budget:] if len(p) > budget else p for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    stops = set(self.tokenizer.stop_token_ids)
    stop_ids = jnp.asarray(self.tokenizer.stop_token_ids, jnp.int32)
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), self.batch_size):
      rows = order[start:start + self.batch_size]
      width = _bucket(max(len(prompts[i]) for i in rows), budget)
      batch = np.full((self.batch_size, width), self.config.pad_token_id, np.int32)
      lengths = np.ones((self.batch_size,), np.int32)  # padding rows: one pad token
      for r, i in enumerate(rows):
        batch[r, :len(prompts[i])] = prompts[i]
        lengths[r] = len(prompts[i])
      new = _generate(self.params, jnp.asarray(batch), jnp.asarray(lengths), jax.random.key(seed + start),
                      stop_ids, config=self.config, max_new_tokens=int(max_tokens), temperature=float(temperature),
                      top_k=0, max_len=width + int(max_tokens))
      for r, i in enumerate(rows):
        for t in np.asarray(new[r]).tolist():
          if t in stops:
            break
          out[i].append(t)
    return out

  # ---- scoring ---------------------------------------------------------------------------------------------
  def score_ids(self, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each sequence of n ids: (log p(id_t | ids_<t), argmax id, its log p), each [n - 1], t = 1..n-1."""
    for s in sequences:
      if not 2 <= len(s) <= self.max_length:
        raise BackendError(f"a scored sequence needs 2..{self.max_length} tokens, got {len(s)}")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[Any] = [None] * len(sequences)
    for start in range(0, len(order), self.batch_size):
      rows = order[start:start + self.batch_size]
      width = _bucket(max(len(sequences[i]) for i in rows) - 1, self.max_length)
      tokens = np.full((self.batch_size, width), self.config.pad_token_id, np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      for r, i in enumerate(rows):
        s = sequences[i]
        tokens[r, :len(s) - 1] = s[:-1]
        targets[r, :len(s) - 1] = s[1:]
      lp, top, top_lp = (np.asarray(a) for a in _score(self.params, jnp.asarray(tokens), jnp.asarray(targets),
                                                         config=self.config))
      for r, i in enumerate(rows):
        n = len(sequences[i]) - 1
        out[i] = (lp[r, :n], top[r, :n], top_lp[r, :n])
    return out

  def loglikelihood_tokens(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]:
    seqs, spans = [], []
    for ctx, cont in requests:
      if not ctx or not cont:
        raise BackendError("a token request needs a non-empty context (at least <s>) and continuation")
      full = list(ctx) + list(cont)
      if len(full) > self.max_length:
        full = full[len(full) - self.max_length:]
        if len(cont) >= len(full):
          raise BackendError(f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
      seqs.append(full)
      spans.append(len(cont))
    return [(float(np.sum(lp[-n:], dtype=np.float64)), bool(np.array_equal(top[-n:], np.asarray(s[-n:]))))
            for (lp, top, _), n, s in zip(self.score_ids(seqs), spans, seqs)]
