"""SFT and preference data: records -> chat messages -> tokens with per-turn loss -> packed rows.

Shapes: N rows, T seq_len; rows hold the pretraining fields (packing.ROW_FIELDS), each int32 [N, T].

Record formats (`fmt="auto"` picks by keys):
  alpaca        {"instruction", "input"?, "output", "system"?}: user = instruction, plus "\\n" + input if any
  openai        {"messages": [{"role", "content", "loss"?, "name"?, "tool_calls"?}, ...], "tools"?: [...]}
  conversation  XTuner's {"conversation": [{"system"?, "input", "output"}, ...]}
Roles as in tokenizer.render_chat (system, user, assistant, environment, and OpenAI `tool`). A turn is trained
when its `loss` flag says so; by default assistant turns are trained and system, user, environment and tool turns
are not. Tool calls (`tool_calls`) are part of their assistant turn; the tools schema turn is never trained.

Token layout of one turn (matching tokenizer.render_chat's text exactly; checked per sample):
  `<|im_start|>{role}[ name=..]\\n`  masked     `{content}{action spans}<|im_end|>`  turn's loss     `\\n` masked
The leading `<s>` is masked. Header, body and separator are encoded separately, as XTuner encodes prompt and
output apart: the body starts on a token boundary exactly where generation starts after the prompt
`...<|im_start|>assistant\\n`, even if the tokenizer would merge across that boundary in one pass.
`loss_mask[i]` is 1 when `targets[i]` (= the next token) is a trained token.

Packing: whole samples, in order (after an optional seeded shuffle), greedily into rows of T; each sample is a
segment (segment_ids 1, 2, ... per row, 0 = padding) with positions restarting at 0, so attention stays within a
sample (XTuner's `use_varlen_attn=True`, InternEvo's default). A sample never spans two rows.

Samples longer than T, by `truncation`:
  "turns"  drop whole turns from the end until it fits (the cut is always at a turn boundary)
  "end"    keep the first T tokens (a token-level cut never splits a special token: each is one id)
  "skip"   drop the sample, counted in the summary
  "error"  raise SFTDataError naming the record
A truncated sample left with no trained token is skipped and counted ("too_long"). Malformed records (missing
fields, unknown role, bad content) raise with `on_error="raise"` or are counted skips ("invalid") with "skip".
Nothing is dropped without a count in `SFTSummary`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from internlm_jax.data.packing import ROW_FIELDS, empty_rows
from internlm_jax.data.sources import DataError
from internlm_jax.tokenizer import BOS, IM_END, IM_START, ChatTemplateError, render_chat

FORMATS = ("auto", "alpaca", "openai", "conversation")
TRUNCATIONS = ("turns", "end", "skip", "error")
_SEP = "\n"


class SFTDataError(DataError):
  """A record that cannot become an SFT sample (the message names the record and the reason)."""


@dataclasses.dataclass
class Sample:
  """One encoded conversation: ids int32 [n], trained bool [n] (the token itself is trained), turn_ends
  (token index just past each turn, separator included; the first entry is after `<s>`)."""
  ids: np.ndarray
  trained: np.ndarray
  turn_ends: list[int]


@dataclasses.dataclass
class SFTSummary:
  samples: int = 0          # records read
  kept: int = 0
  truncated: int = 0        # kept after a cut
  tokens: int = 0           # tokens of kept samples
  trained_tokens: int = 0   # loss positions
  rows: int = 0
  pad_tokens: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  errors: list[str] = dataclasses.field(default_factory=list)  # the first few skip reasons, verbatim

  def skip(self, reason: str, message: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    if len(self.errors) < 10:
      self.errors.append(message)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    fill = self.tokens / max(self.rows, 1)
    return (f"{self.samples} samples: {self.kept} kept ({self.truncated} truncated), skipped {self.skipped or 0}; "
            f"{self.tokens} tokens, {self.trained_tokens} trained; {self.rows} rows, {self.pad_tokens} padding "
            f"({fill:.1f} tokens/row)")


# ---- records -> messages -------------------------------------------------------------------------------------
def _need(record: Mapping, key: str, kind=str):
  if key not in record:
    raise SFTDataError(f"missing field {key!r}")
  if not isinstance(record[key], kind):
    raise SFTDataError(f"field {key!r} must be {getattr(kind, '__name__', kind)}, got {type(record[key]).__name__}")
  return record[key]


def to_messages(record: Mapping[str, Any], fmt: str = "auto") -> tuple[list[dict[str, Any]], list | None]:
  """(messages with optional `loss` flags, tools or None) for one record in any of the formats above."""
  if not isinstance(record, Mapping):
    raise SFTDataError(f"a record must be a JSON object, got {type(record).__name__}")
  if fmt not in FORMATS:
    raise SFTDataError(f"fmt must be one of {FORMATS}, got {fmt!r}")
  if fmt == "auto":
    fmt = ("openai" if "messages" in record else "conversation" if "conversation" in record
           else "alpaca" if "instruction" in record else None)
    if fmt is None:
      raise SFTDataError(f"unknown record format (keys {sorted(record)[:6]}); expected 'messages', "
                         "'conversation' or 'instruction'/'output'")
  if fmt == "openai":
    messages = _need(record, "messages", list)
    tools = record.get("tools") or None
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or "role" not in m:
        raise SFTDataError(f"messages[{i}] must be an object with a 'role'")
      if "loss" in m and not isinstance(m["loss"], bool):
        raise SFTDataError(f"messages[{i}].loss must be true or false, got {m['loss']!r}")
    return [dict(m) for m in messages], tools
  if fmt == "alpaca":
    instruction, output = _need(record, "instruction"), _need(record, "output")
    extra = record.get("input") or ""
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": output})
    return messages, None
  messages = []
  for i, turn in enumerate(_need(record, "conversation", list)):
    if not isinstance(turn, Mapping):
      raise SFTDataError(f"conversation[{i}] must be an object")
    if turn.get("system"):
      messages.append({"role": "system", "content": turn["system"]})
    messages.append({"role": "user", "content": _need(turn, "input")})
    messages.append({"role": "assistant", "content": _need(turn, "output")})
  return messages, None


# ---- messages -> tokens --------------------------------------------------------------------------------------
def _turn_loss(message: Mapping[str, Any]) -> bool:
  loss = message.get("loss")
  return message.get("role") == "assistant" if loss is None else bool(loss)


def encode_messages(tokenizer, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None) -> Sample:
  """Token ids and per-token trained flags of a conversation (no generation prompt); see the module doc."""
  turns = [(m, _turn_loss(m)) for m in messages]
  if tools:
    tools_turn = render_chat([], tools=tools, add_generation_prompt=False)[len(BOS):]
    turns.insert(1 if turns and turns[0][0].get("role") == "system" else 0, (tools_turn, False))
  ids, trained, turn_ends = tokenizer.encode(BOS), [False], []
  texts = [BOS]
  turn_ends.append(len(ids))
  for message, loss in turns:
    text = message if isinstance(message, str) else render_chat([message], add_generation_prompt=False)[len(BOS):]
    texts.append(text)
    header_end = text.index(_SEP) + 1
    body_end = len(text) - len(IM_END + _SEP)
    for part, flag in ((text[:header_end], False), (text[header_end:body_end] + IM_END, loss), (_SEP, False)):
      part_ids = tokenizer.encode(part)
      ids += part_ids
      trained += [flag] * len(part_ids)
    turn_ends.append(len(ids))
  if "".join(texts) != render_chat(messages, tools=tools, add_generation_prompt=False):
    raise SFTDataError("per-turn rendering differs from tokenizer.render_chat; the chat template changed?")
  return Sample(np.asarray(ids, np.int32), np.asarray(trained, bool), turn_ends)


def truncate(sample: Sample, max_len: int, mode: str) -> Sample | None:
  """The sample cut to at most max_len tokens per `mode` ("turns" or "end"); None if nothing trainable is left."""
  if len(sample.ids) > max_len:
    if mode == "turns":
      keep = max((e for e in sample.turn_ends if e <= max_len), default=0)
    elif mode == "end":
      keep = max_len
    else:
      raise SFTDataError(f"truncation must be 'turns' or 'end' here, got {mode!r}")
    sample = Sample(sample.ids[:keep], sample.trained[:keep], [e for e in sample.turn_ends if e <= keep])
  # Position 0 is never a target, so a sample needs a trained token after its first.
  return sample if sample.trained[1:].any() else None


def _encode_record(record, index: int, tokenizer, fmt: str, max_len: int, truncation: str, summary: SFTSummary,
                   on_error: str, prompt_only: bool = False) -> Sample | None:
  try:
    messages, tools = to_messages(record, fmt)
    if prompt_only:
      messages = [dict(m, loss=False) for m in messages]
    sample = encode_messages(tokenizer, messages, tools)
  except (SFTDataError, ChatTemplateError) as e:
    if on_error == "raise":
      raise SFTDataError(f"record {index}: {e}") from None
    summary.skip("invalid", f"record {index}: {e}")
    return None
  return _fit(sample, index, max_len, truncation, summary)


def _fit(sample: Sample, index: int, max_len: int, truncation: str, summary: SFTSummary) -> Sample | None:
  n = len(sample.ids)
  if n > max_len and truncation == "error":
    raise SFTDataError(f"record {index}: {n} tokens exceed the limit of {max_len} (truncation='error')")
  if n > max_len and truncation == "skip":
    summary.skip("too_long", f"record {index}: {n} tokens > {max_len}")
    return None
  fitted = truncate(sample, max_len, truncation if n > max_len else "end")
  if fitted is None:
    summary.skip("too_long" if n > max_len else "no_trained_tokens",
                 f"record {index}: no trained token{' within the first %d tokens' % max_len if n > max_len else ''}")
    return None
  summary.truncated += int(n > max_len)
  return fitted


def _check_options(tokenizer, seq_len: int, truncation: str, on_error: str) -> None:
  if seq_len < 2 or truncation not in TRUNCATIONS or on_error not in ("raise", "skip"):
    raise SFTDataError(f"need seq_len >= 2, truncation in {TRUNCATIONS}, on_error 'raise' or 'skip'; got "
                       f"{seq_len}, {truncation!r}, {on_error!r}")
  for piece in (IM_START, IM_END):  # a clear error for a vocabulary without the chat pieces
    tokenizer.special_id(piece)


# ---- packing -------------------------------------------------------------------------------------------------
def _write(rows, r: int, start: int, segment: int, sample: Sample) -> None:
  n = len(sample.ids)
  span = slice(start, start + n)
  rows["tokens"][r, span] = sample.ids
  rows["segment_ids"][r, span] = segment
  rows["positions"][r, span] = np.arange(n, dtype=np.int32)
  rows["targets"][r, start:start + n - 1] = sample.ids[1:]
  rows["loss_mask"][r, start:start + n - 1] = sample.trained[1:]


def pack_samples(samples: Sequence[Sample], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows [N, T] of whole samples, greedily in order (see the module doc); every sample must fit in T."""
  placements, row, fill, segment = [], 0, 0, 0
  for sample in samples:
    n = len(sample.ids)
    if n > seq_len:
      raise SFTDataError(f"a sample of {n} tokens does not fit rows of {seq_len}; truncate first")
    if fill + n > seq_len:
      row, fill, segment = row + 1, 0, 0
    segment += 1
    placements.append((row, fill, segment))
    fill += n
  rows = empty_rows(row + 1 if placements else 0, seq_len, pad_id)
  for sample, (r, start, seg) in zip(samples, placements):
    _write(rows, r, start, seg, sample)
  return rows


def build_sft_rows(records: Iterable[Mapping[str, Any]], tokenizer, seq_len: int, *, fmt: str = "auto",
                   truncation: str = "turns", on_error: str = "raise",
                   shuffle_seed: int | None = None) -> tuple[dict[str, np.ndarray], SFTSummary]:
  """Packed SFT rows (int32 [N, seq_len] per ROW_FIELDS) and their summary."""
  _check_options(tokenizer, seq_len, truncation, on_error)
  summary, samples = SFTSummary(), []
  for index, record in enumerate(records):
    summary.samples += 1
    sample = _encode_record(record, index, tokenizer, fmt, seq_len, truncation, summary, on_error)
    if sample is not None:
      samples.append(sample)
  if shuffle_seed is not None:
    samples = [samples[i] for i in np.random.default_rng(shuffle_seed).permutation(len(samples))]
  rows = pack_samples(samples, seq_len, tokenizer.pad_id)
  summary.kept = len(samples)
  summary.tokens = sum(len(s.ids) for s in samples)
  summary.trained_tokens = int(rows["loss_mask"].sum())
  summary.rows = len(rows["tokens"])
  summary.pad_tokens = int((rows["segment_ids"] == 0).sum())
  return rows, summary


# ---- preference pairs (DPO) ----------------------------------------------------------------------------------
def _response(value, where: str) -> list[dict[str, Any]]:
  if isinstance(value, str):
    return [{"role": "assistant", "content": value}]
  if isinstance(value, Mapping):
    return [dict(value)]
  if isinstance(value, list) and value:
    return [dict(m) for m in value]
  raise SFTDataError(f"field {where!r} must be a string, a message or a list of messages")


def build_dpo_rows(records: Iterable[Mapping[str, Any]], tokenizer, seq_len: int, *, truncation: str = "skip",
                   on_error: str = "raise") -> tuple[dict[str, dict[str, np.ndarray]], SFTSummary]:
  """{"chosen": rows, "rejected": rows} with one sequence per row (row p of each is pair p), and a summary
  counting pairs. Records: {"prompt": str or messages, "chosen", "rejected": str, message or messages,
  "system"?, "tools"?}. Prompt turns are never trained; response turns follow the usual loss rules.
  truncation "end" cuts a too-long sequence from its end, "skip"/"error" as for SFT ("turns" acts as "end").
  """
  _check_options(tokenizer, seq_len, truncation, on_error)
  summary, pairs = SFTSummary(), []
  for index, record in enumerate(records):
    summary.samples += 1
    try:
      if not isinstance(record, Mapping):
        raise SFTDataError("a record must be a JSON object")
      prompt = _need(record, "prompt", (str, list))
      prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
      if record.get("system"):
        prompt.insert(0, {"role": "system", "content": record["system"]})
      prompt = [dict(m, loss=False) for m in prompt]
      sides = [encode_messages(tokenizer, prompt + _response(_need(record, k, (str, dict, list)), k),
                               record.get("tools")) for k in ("chosen", "rejected")]
    except (SFTDataError, ChatTemplateError) as e:
      if on_error == "raise":
        raise SFTDataError(f"record {index}: {e}") from None
      summary.skip("invalid", f"record {index}: {e}")
      continue
    mode = "end" if truncation == "turns" else truncation
    why = SFTSummary()
    fitted = [_fit(s, index, seq_len, mode, why) for s in sides]
    if any(f is None for f in fitted):
      summary.skip(next(iter(why.skipped)), why.errors[0])
      continue
    summary.truncated += int(any(len(f.ids) < len(s.ids) for f, s in zip(fitted, sides)))
    pairs.append(fitted)
  out = {}
  for side, name in enumerate(("chosen", "rejected")):
    rows = empty_rows(len(pairs), seq_len, tokenizer.pad_id)
    for p, pair in enumerate(pairs):
      _write(rows, p, 0, 1, pair[side])
    out[name] = rows
  summary.kept = summary.rows = len(pairs)
  summary.tokens = int(sum((r["segment_ids"] > 0).sum() for r in out.values()))
  summary.trained_tokens = int(sum(r["loss_mask"].sum() for r in out.values()))
  summary.pad_tokens = int(sum((r["segment_ids"] == 0).sum() for r in out.values()))
  return out, summary


# ---- files and batches ---------------------------------------------------------------------------------------
def load_records(path: str | os.PathLike) -> list[Any]:
  """Records of a .jsonl file (one JSON value per line) or a .json file holding a list."""
  path = os.fspath(path)
  if os.path.isdir(path):  # open() would raise IsADirectoryError deep in the loader
    raise SFTDataError(f"{path}: is a folder; name the .jsonl / .json files (comma-separated)")
  # Undecodable bytes and a malformed .json would otherwise escape as a raw UnicodeDecodeError/JSONDecodeError
  # traceback; each is reported with the file (and line) to fix.
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except UnicodeDecodeError as e:
        raise SFTDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None
      except json.JSONDecodeError as e:
        hint = "; JSON-lines files must be named .jsonl" if e.msg == "Extra data" else ""
        raise SFTDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}){hint}") from None
    if not isinstance(data, list):
      raise SFTDataError(f"{path}: a .json dataset must hold a list of records")
    return data
  out = []
  with open(path, "rb") as f:  # bytes, decoded line by line, so a bad byte is reported with its line
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise SFTDataError(f"{path}:{n}: not UTF-8 text ({e.reason}); re-encode the file as UTF-8") from None
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise SFTDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def _pad(batch, batch_size: int, pad_id: int):
  """Pads a short final batch with all-padding rows (any nesting of row dicts)."""
  if isinstance(batch, Mapping) and "tokens" not in batch:
    return {k: _pad(v, batch_size, pad_id) for k, v in batch.items()}
  missing = batch_size - len(batch["tokens"])
  if missing <= 0:
    return batch
  extra = empty_rows(missing, batch["tokens"].shape[1], pad_id)
  return {k: np.concatenate([batch[k], extra[k]]) for k in ROW_FIELDS}


def make_batches(rows, batch_size: int, pad_id: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = False) -> grain.IterDataset:
  """A checkpointable grain iterator of batches over rows (SFT rows, or {"chosen", "rejected"} pair rows);
  each epoch reshuffled with its own seed; a short final batch is padded unless dropped."""
  first = rows["tokens"] if "tokens" in rows else next(iter(rows.values()))["tokens"]
  n = len(first)
  if n == 0 or batch_size < 1:
    raise SFTDataError(f"need at least one row and batch_size >= 1, got {n} rows, batch_size {batch_size}")

  def take(i):
    return {k: (v[i] if "tokens" in rows else {f: a[i] for f, a in v.items()}) for k, v in rows.items()}

  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(take).to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder)
  if not drop_remainder:
    ds = ds.map(lambda b: _pad(b, batch_size, pad_id))
  return ds
