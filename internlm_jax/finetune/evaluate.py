"""Multiple-choice accuracy of a chat model: the option letter with the highest next-token logit wins.

A record is {"messages": [..., {"role": "assistant", ...}], "answer": "C", "options": [...]} (the format of
data.shakespeare_tasks); records without options are not scored. The prompt is every turn before the final
assistant turn plus the generation header `<|im_start|>assistant\\n`, tokenized exactly as SFT tokenizes it
(data.sft.encode_messages: header and body apart), so the letter is scored at the very position where training
put it. Comparing only the option letters' logits (OpenCompass's CLP-style scoring) measures the choice, not
how well the model follows the answer format; each letter must be a single token.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig
from internlm_jax.data.sft import encode_messages
from internlm_jax.data.shakespeare_tasks import LETTERS
from internlm_jax.model import forward
from internlm_jax.quant_nf4 import gather_embedding
from internlm_jax.tokenizer import IM_START


def prompt_ids(tokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
  """Ids of the conversation before its final assistant turn, ending with the assistant header."""
  turns = list(messages[:-1]) if messages and messages[-1].get("role") == "assistant" else list(messages)
  ids = encode_messages(tokenizer, [dict(m, loss=False) for m in turns]).ids.tolist()
  return ids + tokenizer.encode(f"{IM_START}assistant\n")


def letter_ids(tokenizer, count: int) -> list[int]:
  ids = []
  for letter in LETTERS[:count]:
    encoded = tokenizer.encode(letter)
    if len(encoded) != 1:
      raise ValueError(f"option letter {letter!r} is {len(encoded)} tokens in this tokenizer; need exactly one")
    ids.append(encoded[0])
  return ids


@functools.partial(jax.jit, static_argnames=("config",))
def _last_logits(params, tokens, lengths, config: ModelConfig):
  # Right padding never reaches a row's last real position under causal attention.
  params, tokens = gather_embedding(params, tokens)  # a quantized (QLoRA) embedding: decode only these rows
  logits = forward(params, tokens, config)
  return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def choice_predictions(params, config: ModelConfig, tokenizer, records: Sequence[dict], *,
                       batch_size: int = 16, bucket: int = 64) -> list[str]:
  """The predicted letter of each record (records must have `options`)."""
  prompts = [prompt_ids(tokenizer, r["messages"]) for r in records]
  counts = [len(r["options"]) for r in records]
  candidates = letter_ids(tokenizer, max(counts))
  # Whole batches on every device count, and few distinct lengths, so the jitted forward compiles rarely.
  devices = jax.device_count()
  batch_size = -(-batch_size // devices) * devices
  predictions = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    width = -(-max(len(p) for p in chunk) // bucket) * bucket
    tokens = np.full((batch_size, width), config.pad_token_id, np.int32)
    lengths = np.ones((batch_size,), np.int32)
    for row, p in enumerate(chunk):
      tokens[row, :len(p)] = p
      lengths[row] = len(p)
    last = np.asarray(_last_logits(params, jnp.asarray(tokens), jnp.asarray(lengths), config))
    for row in range(len(chunk)):
      n = counts[start + row]
      predictions.append(LETTERS[int(np.argmax(last[row, candidates[:n]]))])
  return predictions


def choice_accuracy(params, config: ModelConfig, tokenizer, records: Sequence[dict], **kwargs) -> dict[str, Any]:
  """{"accuracy", "n", "by_task": {task: accuracy}, "chance"} over the records that have options."""
  scored = [r for r in records if r.get("options")]
  if not scored:
    return {"accuracy": None, "n": 0, "by_task": {}, "chance": None}
  predicted = choice_predictions(params, config, tokenizer, scored, **kwargs)
  hits = [p == r["answer"] for p, r in zip(predicted, scored)]
  by_task: dict[str, list[bool]] = {}
  for r, hit in zip(scored, hits):
    by_task.setdefault(r.get("task", "all"), []).append(hit)
  return {"accuracy": float(np.mean(hits)), "n": len(hits),
          "by_task": {t: float(np.mean(v)) for t, v in sorted(by_task.items())},
          "chance": float(np.mean([1.0 / len(r["options"]) for r in scored]))}
