"""Prompt templates: zero- and few-shot, plain text or chat rounds.

A dataset's template config (all strings use `{field}` of the sample; `{{`/`}}` for literal braces):
  prefix      once at the top (plain) or as the system turn (chat), e.g. "The following are multiple choice
              questions about {subject_name}.\\n\\n"
  prompt      the question part, e.g. "Question: {question}\\nAnswer:"
  answer      what follows the prompt in a few-shot example, e.g. " {reference}"; for ppl/ll modes it is
              also the scored continuation of each option, with `{label}` and `{option}` set per option
  separator   between few-shot examples (plain mode), default "\\n\\n"
  num_shots   how many examples from the few-shot pool (0 = zero-shot)
  fewshot     "first" (fixed, as OpenCompass's FixKRetriever) or "random" (seeded per sample, reproducible)
  chat        True: render as chat rounds (user = prompt, assistant = answer), for chat models
"""
from __future__ import annotations

import hashlib
import random
import string
from typing import Any, Mapping

Messages = list[dict[str, str]]


class TemplateError(ValueError):
  """A template names a field the sample does not have, or is malformed."""


class _Fields(dict):
  def __missing__(self, key):
    raise TemplateError(f"template field {{{key}}} is not in the sample (fields: {sorted(self)})")


def render(template: str, sample: Mapping[str, Any], **extra) -> str:
  try:
    return string.Formatter().vformat(template, (), _Fields({**sample, **extra}))
  except (ValueError, IndexError) as e:
    raise TemplateError(f"bad template {template!r}: {e}") from None


def pick_shots(pool: list[dict], sample: Mapping[str, Any], num_shots: int, how: str = "first",
               seed: int = 0, exclude_self: bool = True) -> list[dict]:
  """Few-shot examples for `sample`; never the sample itself when the pool is the evaluated set
  (`exclude_self`, matched by id); restricted to the same `subject` when the pool has one (MMLU's
  per-subject dev sets)."""
  if num_shots <= 0:
    return []
  candidates = [s for s in pool if not exclude_self or s.get("id") != sample.get("id")]
  if "subject" in sample:
    same = [s for s in candidates if s.get("subject") == sample["subject"]]
    candidates = same or candidates
  if how == "first":
    return candidates[:num_shots]
  if how == "random":
    # Seeded by the sample id, so a resumed or reordered run draws the same examples.
    key = int(hashlib.sha256(f"{seed}:{sample.get('id')}".encode()).hexdigest()[:8], 16)
    return random.Random(key).sample(candidates, min(num_shots, len(candidates)))
  raise TemplateError(f"fewshot must be 'first' or 'random', got {how!r}")


def build_prompt(template: Mapping[str, Any], sample: Mapping[str, Any], shots: list[dict]) -> str | Messages:
  """The model input for `sample`: a string (plain) or a list of chat messages (template.chat)."""
  prefix = template.get("prefix", "") or ""
  prompt, answer = template.get("prompt", "{question}"), template.get("answer", " {reference}")
  if template.get("chat", False):
    messages: Messages = []
    if prefix:
      messages.append({"role": "system", "content": render(prefix, sample).strip()})
    for shot in shots:
      messages.append({"role": "user", "content": render(prompt, shot)})
      messages.append({"role": "assistant", "content": render(answer, shot, **_gold_fields(shot)).strip()})
    messages.append({"role": "user", "content": render(prompt, sample)})
    return messages
  separator = template.get("separator", "\n\n")
  parts = [render(prompt, s) + render(answer, s, **_gold_fields(s)) for s in shots]
  parts.append(render(prompt, sample))
  return render(prefix, sample) + separator.join(parts)


def _gold_fields(sample: Mapping[str, Any]) -> dict[str, str]:
  """`{label}`/`{option}` of a few-shot example: its right answer."""
  if sample.get("options") and sample.get("gold") is not None:
    return {"label": sample["labels"][sample["gold"]], "option": sample["options"][sample["gold"]]}
  return {}


def option_continuations(template: Mapping[str, Any], sample: Mapping[str, Any]) -> list[str]:
  """The scored continuation of each option (ppl/ll modes): `answer` with `{label}`/`{option}` filled in."""
  if not sample.get("options"):
    raise TemplateError(f"sample {sample.get('id')!r} has no options; ppl/ll modes need multiple choice")
  answer = template.get("answer", " {label}")
  return [render(answer, sample, label=lab, option=opt) for lab, opt in zip(sample["labels"], sample["options"])]


def flatten_chat(messages: Messages) -> str:
  """A readable one-string form of chat messages, for prediction files."""
  return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)
