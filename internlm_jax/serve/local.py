"""The serving engine inside this process, for callers that are not HTTP clients (the evaluator, agents).

`EngineSession` owns an Engine and a running Scheduler for one (params, config, tokenizer) and turns a list of
prompts into finished generations: every prompt is submitted at once, so the scheduler batches them
continuously (a finished sequence's slot is refilled on the next step), stop strings and stop tokens end a
sequence as soon as they appear, and each request samples with its own key sequence (`seed`), so its output does
not depend on the other prompts of the call.

    with EngineSession(params, config, tokenizer, max_slots=8) as session:
      texts = session.generate(["Question: 2 + 3 = ?"], max_tokens=32, stop=["\\n"])
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from internlm_jax.config import ModelConfig
from internlm_jax.serve.engine import EngineConfig
from internlm_jax.serve.loading import build_engine
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.scheduler import Finished, Scheduler, ServerBusyError

# We are the only client, so the queue need not push back: a whole batch of prompts waits in it.
_UNBOUNDED_QUEUE = 1 << 30


class GenerationError(RuntimeError):
  """A request was refused (too long, bad parameters) or failed inside the engine."""


class EngineSession:
  """An Engine + Scheduler over `params`. `engine_config` overrides everything; otherwise `max_slots` sequences
  of up to `max_seq_len` tokens (default: the model's context) are decoded together. `sample_vocab` (default: the
  tokenizer's size) keeps sampling to ids the tokenizer can write, as the HTTP server does. On GPU/TPU the page
  pool takes `kv_fraction` of the free device memory (see serve/loading.py)."""

  def __init__(self, params, config: ModelConfig, tokenizer, *, max_slots: int = 8, max_seq_len: int | None = None,
               engine_config: EngineConfig | None = None, sample_vocab: int | None = None, mesh=None,
               kv_fraction: float = 0.8):
    self.tokenizer, self.config = tokenizer, config
    if engine_config is None:
      vocab = min(tokenizer.vocab_size, config.vocab_size) if sample_vocab is None else sample_vocab
      engine_config = EngineConfig(max_slots=max_slots, max_seq_len=max_seq_len, sample_vocab=vocab)
    self.engine = build_engine(config, params, engine_config, mesh=mesh, kv_fraction=kv_fraction)
    self.scheduler = Scheduler(self.engine, tokenizer, max_queue=_UNBOUNDED_QUEUE).start()

  @property
  def max_request_tokens(self) -> int:
    """Longest prompt + output one request may have."""
    return self.engine.max_request_tokens

  def sampling_params(self, max_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0, seed: int = 0,
                      skip_special_tokens: bool = True) -> SamplingParams:
    """Stop strings that are single special pieces (`<|action_end|>`) also become stop ids: the piece is one
    token, so the device ends the sequence on it, and without `skip_special_tokens` it never shows as text."""
    stop = tuple(s for s in stop if s)
    special = self.tokenizer.special_ids
    ids = tuple(special[s] for s in stop if s in special)
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), stop=stop,
                          stop_token_ids=ids, seed=int(seed), skip_special_tokens=skip_special_tokens)

  def encode(self, prompt: str | Sequence[int]) -> list[int]:
    """A text prompt gets `<s>` in front (the evaluator's and HF's convention); token lists are used as they are."""
    if isinstance(prompt, str):
      return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
    return [int(t) for t in prompt]

  def run(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams) -> list[Finished]:
    """Finished generations of `prompts`, in order. Raises GenerationError for a refused or failed request; if
    the caller is interrupted (KeyboardInterrupt) the requests still in flight are cancelled, so their
    slots and pages come back."""
    handles = []
    try:
      for prompt in prompts:
        handles.append(self.scheduler.submit(self.encode(prompt), params))
      results = [h.result() for h in handles]
    except (ValueError, ServerBusyError) as e:  # RequestTooLargeError, SamplingError: refused up front
      self._cancel(handles)
      raise GenerationError(str(e)) from None
    except BaseException:
      self._cancel(handles)
      raise
    for r in results:
      if r.reason in ("error", "cancelled"):
        raise GenerationError(f"generation failed: {r.error or r.reason}")
    return [dataclasses.replace(r, text=self.final_text(r.token_ids, params)) for r in results]

  def final_text(self, token_ids: Sequence[int], params: SamplingParams) -> str:
    """The whole output decoded at once and cut before the first stop string, as the dense path and HF do.

    The scheduler's streamed text is not used: TextStream holds back a trailing incomplete UTF-8 character and
    never releases it at the end, so output that keeps ending mid-character (byte-fallback pieces, common from
    small or random models) would be lost. The stream still decides where decoding stops; the ids it leaves
    past a stop string (up to one engine call's worth) fall after the cut."""
    size = self.tokenizer.vocab_size  # ids of a padded model vocabulary have no text
    text = self.tokenizer.decode([t for t in token_ids if t < size], skip_special_tokens=params.skip_special_tokens)
    cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=len(text))
    return text[:cut]

  def generate(self, prompts: Sequence[str | Sequence[int]], *, max_tokens: int, stop: Sequence[str] = (),
               temperature: float = 0.0, seed: int = 0, skip_special_tokens: bool = True) -> list[str]:
    """Texts of the continuations (without the stop token or stop string)."""
    params = self.sampling_params(max_tokens, stop, temperature, seed, skip_special_tokens)
    return [r.text for r in self.run(prompts, params)]

  @staticmethod
  def _cancel(handles) -> None:
    for handle in handles:
      handle.cancel()  # a no-op for requests that already finished

  def close(self) -> None:
    self.scheduler.stop()

  def __enter__(self) -> "EngineSession":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

