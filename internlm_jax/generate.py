"""Batch text continuation on the dense KV cache: one jitted prefill, then one jitted decode loop.

Shapes: B batch, P prompt tokens (left-aligned, right-padded), N new tokens, V vocab.
This is the simple path used by training demos and tests; serving (paged cache, continuous batching) is serve/.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.model import KVCache, forward_with_cache, init_cache


def _pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Next token [B] from logits [B, V]: argmax at temperature 0, else top-k sampling."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k", "max_len"))
def _generate(params, prompt, prompt_lengths, key, stop_ids, *, config, max_new_tokens, temperature, top_k, max_len):
  B = prompt.shape[0]
  cache = init_cache(config, B, max_len)
  logits, cache = forward_with_cache(params, prompt, config, cache)
  # Rows with shorter prompts: take the logits of their own last token and rewind their length.
  last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
  cache = KVCache(cache.k, cache.v, prompt_lengths)

  def step(carry, key):
    cache, last_logits, done = carry
    token = _pick(last_logits, key, temperature, top_k)
    token = jnp.where(done, stop_ids[0], token)
    done = done | jnp.isin(token, stop_ids)
    logits, cache = forward_with_cache(params, token[:, None], config, cache)
    return (cache, logits[:, 0], done), token

  keys = jax.random.split(key, max_new_tokens)
  _, tokens = jax.lax.scan(step, (cache, last, jnp.zeros((B,), bool)), keys)
  return tokens.T  # [B, N]


def generate(params, config: ModelConfig, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             stop_ids: tuple[int, ...] | None = None) -> list[list[int]]:
  """Continues each prompt (a list of token ids) by up to max_new_tokens; stops at any id in stop_ids.

  Returns the new tokens of each row without the stop token. Greedy when temperature is 0.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
  stop_ids = tuple(stop_ids) if stop_ids else (config.eos_token_id,)
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = int(lengths.max())
  max_len = width + max_new_tokens
  if max_len > config.max_position_embeddings and config.rope_scaling_type != "dynamic":
    raise ValueError(f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
                     f"({config.max_position_embeddings}) and the config has no dynamic NTK scaling")
  batch = np.full((len(prompts), width), config.pad_token_id, np.int32)
  for row, p in enumerate(prompts):
    batch[row, :len(p)] = p
  chex.assert_rank(batch, 2)
  out = _generate(params, jnp.asarray(batch), jnp.asarray(lengths), jax.random.key(seed),
                  jnp.asarray(stop_ids, jnp.int32), config=config, max_new_tokens=max_new_tokens,
                  temperature=float(temperature), top_k=int(top_k), max_len=max_len)
  results = []
  for row in np.asarray(out).tolist():
    kept = []
    for token in row:
      if token in stop_ids:
        break
      kept.append(token)
    results.append(kept)
  return results
