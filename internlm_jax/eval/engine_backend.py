"""The in-process backend over the serving engine: generation through `serve.local.EngineSession` (paged KV cache,
continuous batching, stop strings that end decoding), log-likelihood through `InProcessBackend`'s exact forward.

Compared with the dense path (`InProcessBackend`, which decodes every batch for `max_tokens` and cuts stop strings
afterwards): a sequence that hits a stop string stops costing compute at once, a finished sequence's slot takes
the next prompt instead of idling until its batch ends, and decoding compiles one program for every prompt length.
Greedy generations are the same tokens as the dense path's (up to float rounding), so both share one fingerprint
and one per-sample cache. For that, sampling covers the model's whole vocabulary as the dense path's does;
ids past the tokenizer's (a random model with a padded vocabulary) have no text. `sample_vocab` restricts it,
as our HTTP server does (give such a backend its own `fingerprint`), which changes nothing for a model whose
vocabulary is the tokenizer's (every trained or HF checkpoint).
"""
from __future__ import annotations

from typing import Sequence

from internlm_jax.config import ModelConfig
from internlm_jax.eval.backends import BackendError, InProcessBackend, Messages
from internlm_jax.serve.engine import EngineConfig
from internlm_jax.serve.local import EngineSession, GenerationError
from internlm_jax.tokenizer import Tokenizer


class EngineBackend(InProcessBackend):
  """`batch_size` is both the scoring batch and the number of sequences the engine decodes together;
  `engine_config`, when given, sets the engine up instead (its `max_slots`, `max_seq_len`, `sample_vocab`)."""

  def __init__(self, params, config: ModelConfig, tokenizer: Tokenizer, *, name: str = "model", batch_size: int = 8,
               max_length: int | None = None, fingerprint: str | None = None,
               engine_config: EngineConfig | None = None, sample_vocab: int | None = None, mesh=None,
               kv_fraction: float = 0.8):
    super().__init__(params, config, tokenizer, name=name, batch_size=batch_size, max_length=max_length,
                     fingerprint=fingerprint)
    self.session = EngineSession(params, config, tokenizer, max_slots=self.batch_size, max_seq_len=self.max_length,
                                 engine_config=engine_config, sample_vocab=sample_vocab or config.vocab_size,
                                 mesh=mesh, kv_fraction=kv_fraction)

  def close(self) -> None:
    self.session.close()

  # ---- generation ------------------------------------------------------------------------------------------
  def generate(self, prompts: list[str], *, max_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0,
               seed: int = 0) -> list[str]:
    ids = [[self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in prompts]
    return self._texts(ids, max_tokens, stop, temperature, seed)

  def chat(self, conversations: list[Messages], *, max_tokens: int, stop: Sequence[str] = (),
           temperature: float = 0.0, seed: int = 0) -> list[str]:
    ids = [self.tokenizer.encode_chat(m) for m in conversations]
    return self._texts(ids, max_tokens, stop, temperature, seed)

  def generate_ids(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                   seed: int = 0) -> list[str]:
    return self._texts(prompts, max_tokens, (), temperature, seed)

  def generate_tokens(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                      seed: int = 0) -> list[list[int]]:
    if max_tokens <= 0:
      return [[] for _ in prompts]
    params = self.session.sampling_params(max_tokens, (), temperature, seed)
    return [r.token_ids for r in self._run(prompts, params)]

  def _texts(self, prompts: list[list[int]], max_tokens: int, stop: Sequence[str], temperature: float,
             seed: int) -> list[str]:
    if max_tokens <= 0:
      return ["" for _ in prompts]
    params = self.session.sampling_params(max_tokens, stop, temperature, seed)
    return [r.text for r in self._run(prompts, params)]

  def _run(self, prompts: list[list[int]], params):
    # The dense path's rule: prompts longer than the room left for the answer keep their end (the question).
    room = min(self.max_length, self.session.max_request_tokens) - params.max_tokens
    if room < 1:
      raise BackendError(f"max_tokens={params.max_tokens} leaves no room for a prompt in max_length="
                         f"{min(self.max_length, self.session.max_request_tokens)}")
    prompts = [p[-room:] if len(p) > room else p for p in prompts]
    try:
      return self.session.run(prompts, params)
    except GenerationError as e:
      raise BackendError(str(e)) from None
