"""SentencePiece tokenizer with the InternLM2 special tokens, chat template and tool-call protocol.

Special pieces are always looked up by piece, never by id: the real InternLM2 model has them at 92538..92543,
a tokenizer trained here has them near the start of the vocabulary.

Whitespace. Text between special pieces is encoded segment by segment with the model's own normalizer, as the
HF slow `InternLM2Tokenizer` does (it lets `PreTrainedTokenizer` split on added tokens, then calls
`sp_model.encode` per segment). The real InternLM2 model adds no dummy prefix: public token ids show
"<|im_start|>user\\n" -> [92543, 1008, 364] and "<|im_end|>\\n<|im_start|>assistant\\n" ->
[92542, 364, 92543, 525 "ass", 11353 "istant", 364], i.e. no "▁" in front of "user", "\\n" or "assistant".
`train_tokenizer` therefore trains with `add_dummy_prefix=False`, identity normalization and kept whitespace,
so `decode(encode(text)) == text` for any text. A Llama-style model with a dummy prefix still round-trips:
sentencepiece adds one "▁" per segment on encode and strips one per decoded run.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import sentencepiece as spm

# The chat format's names, re-exported: callers import them from here as well.
from internlm_jax.chat_template import (  # noqa: F401
    ACTION_END, ACTION_START, BOS, CHAT_SPECIAL_PIECES, EOS, IM_END, IM_START, INTERNLM2_SPECIAL_IDS, INTERPRETER,
    PLUGIN, ROLES, UNK, ChatTemplateError, TokenizerError, parse_assistant, render_chat, render_segments)


def _hf_added_tokens(folder: str, vocab_size: int) -> dict[str, int]:
  """Added tokens of an HF tokenizer folder: the real InternLM2 `tokenizer.model` names ids 92538..92543
  `[UNUSED_TOKEN_141..146]`; `tokenizer_config.json`'s `added_tokens_decoder` renames them `<|plugin|>`..."""
  config_path = os.path.join(folder, "tokenizer_config.json")
  if not os.path.isfile(config_path):
    return {}
  try:
    with open(config_path, encoding="utf-8") as f:
      decoder = json.load(f).get("added_tokens_decoder", {})
    return {entry["content"]: int(i) for i, entry in decoder.items() if 0 <= int(i) < vocab_size}
  except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
    raise TokenizerError(f"{config_path!r} has no valid 'added_tokens_decoder'; fix or remove the file") from None


class Tokenizer:
  """InternLM2 tokenizer over a sentencepiece model file (or an HF folder holding `tokenizer.model`)."""

  def __init__(self, model_path: str | os.PathLike):
    path = os.fspath(model_path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
      path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
      raise TokenizerError(f"tokenizer file {path!r} does not exist; pass a sentencepiece .model file")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except RuntimeError:
      raise TokenizerError(
          f"tokenizer file {path!r} is not a sentencepiece model; pass a .model file (e.g. from "
          "experiments/train_tokenizer.py or an InternLM2 checkpoint)") from None
    self.path = path
    # Pieces split out of text before sentencepiece sees it: only those the vocabulary has.
    self._piece_ids: dict[str, int] = {}
    for piece in (BOS, EOS) + CHAT_SPECIAL_PIECES:
      pid = self._sp.piece_to_id(piece)
      if self._sp.id_to_piece(pid) == piece and pid != self._sp.unk_id():
        self._piece_ids[piece] = pid
    self._piece_ids.update(_hf_added_tokens(os.path.dirname(path), self._sp.get_piece_size()))
    self._id_pieces = {i: p for p, i in self._piece_ids.items()}
    longest_first = sorted(self._piece_ids, key=len, reverse=True)
    self._split_re = re.compile("(" + "|".join(re.escape(p) for p in longest_first) + ")")

  # ---- vocabulary -------------------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def pad_id(self) -> int:
    """The model's pad id, or eos when it has none (as InternLM2: pad = eos = 2)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.eos_id

  @property
  def special_ids(self) -> dict[str, int]:
    """Ids of the InternLM2 chat pieces this vocabulary has (all six for a chat tokenizer)."""
    return {p: self._piece_ids[p] for p in CHAT_SPECIAL_PIECES if p in self._piece_ids}

  def special_id(self, piece: str) -> int:
    """Id of one chat piece; a clear error when this vocabulary lacks it."""
    if piece not in self._piece_ids:
      raise TokenizerError(f"tokenizer {self.path!r} has no special piece {piece!r}; train it with "
                           "internlm_jax.tokenizer.train_tokenizer (which adds the InternLM2 chat pieces)")
    return self._piece_ids[piece]

  @property
  def stop_token_ids(self) -> list[int]:
    """Generation stops at `</s>` or `<|im_end|>` (only `</s>` for a vocabulary without chat pieces)."""
    return [self.eos_id] + ([self._piece_ids[IM_END]] if IM_END in self._piece_ids else [])

  def token_to_id(self, piece: str) -> int:
    pid = self._sp.piece_to_id(piece)
    if self._sp.id_to_piece(pid) != piece:
      raise TokenizerError(f"piece {piece!r} is not in the vocabulary of {self.path!r}")
    return pid

  def id_to_token(self, token_id: int) -> str:
    if not 0 <= int(token_id) < self.vocab_size:
      raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size}) of {self.path!r}")
    return self._sp.id_to_piece(int(token_id))

  # ---- text <-> ids -----------------------------------------------------------------------------------------
  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`; special pieces in the text (`<s>`, `<|im_end|>`, ...) become their single ids."""
    if (add_bos and self.bos_id < 0) or (add_eos and self.eos_id < 0):
      raise TokenizerError(f"tokenizer {self.path!r} has no <s> or </s> piece to add")
    ids = [self.bos_id] if add_bos else []
    # re.split with one capture group alternates text (even index) and special piece (odd index).
    for i, part in enumerate(self._split_re.split(text) if self._piece_ids else [text]):
      if i % 2:
        ids.append(self._piece_ids[part])
      elif part:
        ids.extend(self._sp.encode(part))
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special ids are written as their pieces unless `skip_special_tokens`."""
    out: list[str] = []
    run: list[int] = []
    for token_id in ids:
      token_id = int(token_id)
      if not 0 <= token_id < self._sp.get_piece_size():
        raise TokenizerError(f"token id {token_id} is outside the vocabulary of {self.path!r}")
      piece = self._id_pieces.get(token_id)
      if piece is None:
        run.append(token_id)
        continue
      # Decode ordinary ids in runs so multi-byte characters split over byte-fallback ids stay whole.
      out.append(self._sp.decode(run))
      run = []
      if not skip_special_tokens:
        out.append(piece)
    out.append(self._sp.decode(run))
    return "".join(out)

  # ---- chat -------------------------------------------------------------------------------------------------
  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                          add_generation_prompt: bool = True) -> str:
    return render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                  add_generation_prompt: bool = True, special_in_content: bool = False) -> list[int]:
    """Ids of the rendered chat; `<s>` comes from the template, so BOS appears once.

    Special pieces written inside the messages (contents, names, tool calls, tool schemas) are encoded as the
    text they are, never as their special ids, unless `special_in_content`: a client cannot open a turn, close
    one or fake a tool call by writing `<|im_end|>` or `<|action_start|>` (OpenAI's rule; HF's
    `apply_chat_template(tokenize=True)` and LMDeploy parse them, which `special_in_content=True` reproduces).
    The ids differ from `encode(render_chat(...))` only where the messages hold such a piece.
    """
    for piece in (IM_START, IM_END) + ((PLUGIN,) if tools else ()):
      self.special_id(piece)
    segments = render_segments(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    if special_in_content:
      return self.encode("".join(text for text, _ in segments))
    return self.encode_segments(segments)

  def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
    """Ids of (text, from_client) segments, as `encode` of their concatenation except that special pieces inside
    client text stay text (see `encode_chat`)."""
    # Runs of text between the template's special pieces are encoded whole, as `encode` would. A special piece
    # inside client text is cut after its first character ("<" | "|im_end|>"), so that neither sentencepiece
    # (which matches user-defined pieces itself) nor the splitting here can see the piece whole; no piece
    # ends in "<" or holds a "<" after its first character, so the cut cannot make another one.
    chunks: list[str | int] = []
    run: list[str] = []
    for text, from_client in segments:
      for i, part in enumerate(self._split_re.split(text) if self._piece_ids else [text]):
        if not i % 2:
          run.append(part)
        elif from_client:
          run.append(part[:1])
          chunks.append("".join(run))
          run = [part[1:]]
        else:
          chunks += ["".join(run), self._piece_ids[part]]
          run = []
    chunks.append("".join(run))
    ids: list[int] = []
    for chunk in chunks:
      if isinstance(chunk, int):
        ids.append(chunk)
      elif chunk:
        ids.extend(self._sp.encode(chunk))
    return ids

  def parse_assistant(self, text: str) -> tuple[str, list[dict[str, Any]]]:
    return parse_assistant(text)


# ---- training -------------------------------------------------------------------------------------------------
def _text_files(paths: Iterable[str | os.PathLike]) -> list[str]:
  files = []
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise TokenizerError(f"tokenizer training input {path!r} does not exist")
  return files


def _chunks(text: str, max_bytes: int) -> Iterable[str]:
  """Pieces of `text` under sentencepiece's per-sentence byte limit, cut at newlines where possible."""
  while len(text.encode("utf-8")) > max_bytes:
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    cut = head.rfind("\n") + 1 or len(head)
    yield head[:cut]
    text = text[cut:]
  if text:
    yield text


def train_tokenizer(prefix: str | os.PathLike, vocab_size: int, *, texts: Iterable[str] = (),
                    files: Iterable[str | os.PathLike] = (), model_type: str = "bpe",
                    max_sentence_length: int = 16384, input_sentence_size: int = 0,
                    character_coverage: float = 0.9999, num_threads: int = 1, split_digits: bool = True) -> str:
  """Trains an InternLM2-style sentencepiece model and returns the path of `{prefix}.model`.

  `texts` are documents; `files` are text files or folders (walked recursively), read whole. Both are cut into
  "sentences" of at most `max_sentence_length` bytes at newlines, so newlines are learned as pieces.
  Layout: `<unk>`/`<s>`/`</s>` at 0/1/2, the six chat pieces as user-defined symbols right after (always
  matched whole), byte fallback for unseen characters, no pad (pad = eos). `vocab_size` is a soft limit:
  tiny corpora get the largest vocabulary they support.
  """
  if model_type not in ("bpe", "unigram"):
    raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  min_size = 3 + len(CHAT_SPECIAL_PIECES) + 256 + 1
  if vocab_size < min_size:
    raise TokenizerError(f"vocab_size must be at least {min_size} (specials + 256 byte pieces), got {vocab_size}")
  file_list = _text_files(files)

  has_text = []  # set once a non-blank sentence went by: an empty corpus gets a message naming it

  def sentences() -> Iterable[str]:
    for text in texts:
      yield from _chunks(text, max_sentence_length)
    for path in file_list:
      with open(path, encoding="utf-8", errors="replace") as f:
        yield from _chunks(f.read(), max_sentence_length)

  def counted() -> Iterable[str]:
    for sentence in sentences():
      if not has_text and sentence.strip():
        has_text.append(True)
      yield sentence

  def no_text() -> TokenizerError:
    inputs = [*file_list] or ["the given texts"]
    return TokenizerError(f"no text to train the tokenizer on: {', '.join(inputs[:3])}"
                          f"{' ...' if len(inputs) > 3 else ''} hold only empty or whitespace documents")

  prefix = os.fspath(prefix)
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  options = dict(
      model_prefix=prefix, vocab_size=vocab_size, model_type=model_type, hard_vocab_limit=False,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(CHAT_SPECIAL_PIECES),
      byte_fallback=True, character_coverage=character_coverage, split_digits=split_digits,
      add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
      allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_length,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True, num_threads=num_threads,
      minloglevel=2)
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(counted()), **options)
  except RuntimeError as e:
    if not has_text:
      raise no_text() from None
    raise TokenizerError(f"sentencepiece training for {prefix!r} failed: {str(e).splitlines()[0]}") from None
  if not has_text:  # whitespace alone trains a byte-only model: useless, and not what was asked for
    for ext in (".model", ".vocab"):
      if os.path.exists(prefix + ext):
        os.remove(prefix + ext)
    raise no_text()
  return prefix + ".model"
