"""Guided (structured) decoding: OpenAI's `response_format` (JSON object, JSON schema) and LMDeploy's regex,
enforced token by token with llguidance, the grammar engine vLLM, SGLang and llama.cpp use.

Shapes: V the model's (padded) vocabulary, W = ceil(V / 32) words of a token bitmask.

A `Grammar` is compiled once per request from its response_format (a 400 names what is wrong); every sequence
(each of `n` choices, a preempted and resumed one too) owns a `Guide`, an Earley parser state that lives on the
host with its request. Before each decode step the engine masks the slot's logits with the guide's [W] uint32
bitmask (bit t of word t // 32: token t allowed), and after it the guide consumes the sampled token. Why on the
host and one step per call: the next mask depends on the sampled token, and a grammar's token-level automaton
is far too large to ship to the device (a JSON schema over a 92k vocabulary). While any guided sequence runs, the
scheduler decodes one step per host round trip; the others in the batch lose only that.

JSON is written without free whitespace, with json.dumps' separators (", " and ": "): models left free to emit
whitespace inside JSON are known to loop on it until max_tokens. A sequence whose grammar is complete finishes
with "stop" at once (the mask would allow only the stop tokens). Reported logprobs stay the model's own.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

MAX_SCHEMA_BYTES = 64 * 1024  # a response_format larger than this is refused (parsing it is per-request work)
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
  """A response_format that cannot be compiled; the message says what is wrong."""


def _llguidance():
  try:
    import llguidance
  except ImportError as e:  # a declared dependency; this only helps a hand-made environment
    raise GrammarError("response_format needs the llguidance package: pip install llguidance") from e
  return llguidance


class _Wrapper:
  """What llguidance.TokenizerWrapper reads: every id's bytes (special pieces marked with a 0xFF prefix, the
  way llguidance knows them), eos/bos, and a bytes -> ids tokenizer."""

  def __init__(self, tokenizer, vocab_size: int):
    sp = tokenizer._sp
    special = set(tokenizer.special_ids.values())
    tokens, special_ids = [], []
    for i in range(vocab_size):
      if i >= sp.get_piece_size():  # the padded tail of the model's vocabulary: never allowed
        tokens.append(b"")
        continue
      piece = sp.id_to_piece(i)
      if sp.is_byte(i):
        tokens.append(bytes([int(piece[3:5], 16)]))
      elif sp.is_control(i) or sp.is_unknown(i) or i in special:
        tokens.append(b"\xff" + piece.encode("utf-8"))
        special_ids.append(i)
      else:
        tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
    self.tokens, self.special_token_ids = tokens, special_ids
    self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
    self._sp = sp

  def __call__(self, text: bytes) -> list[int]:
    return self._sp.encode(text.decode("utf-8", errors="replace"))


_TOKENIZERS: dict[tuple[str, int, tuple[int, ...]], Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def guidance_tokenizer(tokenizer, vocab_size: int):
  """llguidance's view of `tokenizer` over the model's `vocab_size` ids, cached (building it walks the whole
  vocabulary). The tokenizer's stop ids end a grammar: they are allowed exactly where the grammar may end."""
  llg = _llguidance()
  key = (tokenizer.path, int(vocab_size), tuple(tokenizer.stop_token_ids))
  with _TOKENIZERS_LOCK:
    if key not in _TOKENIZERS:
      wrapper = llg.TokenizerWrapper(_Wrapper(tokenizer, vocab_size))
      _TOKENIZERS[key] = llg.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=list(tokenizer.stop_token_ids))
    return _TOKENIZERS[key]


def grammar_source(response_format: dict[str, Any] | None) -> str | None:
  """llguidance grammar text for an OpenAI-style response_format dict, or None for plain text.

  {"type": "text"}; {"type": "json_object"} (any JSON object); {"type": "json_schema", "json_schema":
  {"name": ..., "schema": {...}, "strict": ...}} (OpenAI); {"type": "regex_schema", "regex_schema": "..."}
  (LMDeploy)."""
  llg = _llguidance()
  if response_format is None:
    return None
  if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
    raise GrammarError("response_format must be an object with a 'type' string")
  kind = response_format["type"]
  if len(json.dumps(response_format, default=str)) > MAX_SCHEMA_BYTES:
    raise GrammarError(f"response_format is larger than {MAX_SCHEMA_BYTES} bytes")
  if kind == "text":
    return None
  if kind == "json_object":
    return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
  if kind == "json_schema":
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
      raise GrammarError("response_format.json_schema must be an object {'name': ..., 'schema': {...}}")
    schema = spec.get("schema", {})
    schema = {} if schema is True else schema  # JSON Schema's `true`: any JSON value
    # OpenAI's `strict`: every keyword enforced, or a 400 naming the one that cannot be. Without it, keywords the
    # grammar cannot express (uniqueItems, say) are left to the model, as lenient validators do.
    options = _JSON_OPTIONS if spec.get("strict") else {**_JSON_OPTIONS, "lenient": True}
    if not isinstance(schema, (dict, bool)):
      raise GrammarError("response_format.json_schema.schema must be a JSON Schema object")
    try:
      return llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    except ValueError as e:
      raise GrammarError(f"response_format.json_schema.schema: {e}") from None
  if kind == "regex_schema":
    regex = response_format.get("regex_schema")
    if not isinstance(regex, str) or not regex:
      raise GrammarError("response_format.regex_schema must be a non-empty regular expression string")
    if (len(regex) - len(regex.rstrip("\\"))) % 2:  # llguidance would silently drop the dangling backslash
      raise GrammarError("response_format.regex_schema ends in an unfinished escape (a lone trailing backslash)")
    return llg.LLMatcher.grammar_from_regex(regex)
  raise GrammarError(f"response_format type {kind!r} is not supported; use 'text', 'json_object', "
                     "'json_schema' or 'regex_schema'")


class Grammar:
  """A compiled, validated grammar over one tokenizer; immutable and shared by a request's sequences."""

  def __init__(self, source: str, lltokenizer, vocab_size: int):
    llg = _llguidance()
    self.source, self.lltokenizer, self.vocab_size = source, lltokenizer, int(vocab_size)
    probe = llg.LLMatcher(lltokenizer, source, log_level=0)
    probe.compute_bitmask()  # the lexer builds its first states lazily: a grammar past its limits fails here
    if probe.is_error() and probe.get_error().startswith("NoExtension"):  # no token can start it
      raise GrammarError("response_format matches no text at all")
    if probe.is_error():
      raise GrammarError(f"response_format does not compile: {_first_line(probe.get_error())}")
    if probe.is_stopped() and not probe.is_accepting():
      raise GrammarError("response_format matches no text at all")
    # Never consumes: every Guide starts as a copy of it (microseconds), not a recompile of the source
    # (milliseconds, on the event loop's thread where Scheduler.submit makes the Request).
    self._initial = probe
    self.end_ids = frozenset(int(t) for t in lltokenizer.eos_tokens)

  def guide(self) -> "Guide":
    return Guide(self)

  def __repr__(self):
    return f"Grammar({self.source[:60]!r}...)"


class Guide:
  """One sequence's parser state. `mask()` -> the [W] uint32 bitmask of tokens allowed next; `consume(t)` after
  each sampled token; `done` once the grammar is complete (or failed: `error`)."""

  def __init__(self, grammar: Grammar):
    self.grammar = grammar
    self._matcher = grammar._initial.deep_copy()

  def mask(self, W: int | None = None) -> np.ndarray:
    """`W`: the engine's words (ceil(model vocab / 32)); ids past the grammar's vocabulary are not allowed, so a
    grammar compiled for the tokenizer's vocabulary (smaller than a padded model's) still fits the slot."""
    words = np.frombuffer(self._matcher.compute_bitmask(), np.uint32)
    W = W or -(-self.grammar.vocab_size // 32)
    out = np.zeros((W,), np.uint32)
    out[:min(W, words.size)] = words[:W]
    return out

  def consume(self, token: int) -> bool:
    return self._matcher.consume_token(int(token))

  def advance(self, token: int) -> tuple[str, str | None] | None:
    """Consumes a sampled token -> None to go on, ("stop", None) once the grammar is complete (only the stop
    tokens could follow: the sequence ends without another step), ("error", message) if it failed."""
    if self.consume(token) and not self.done:
      return None
    return ("error", f"guided decoding: {self.error}") if self.error else ("stop", None)

  def ends(self, token: int) -> bool:
    """Whether `token` is one of the grammar's end tokens (the tokenizer's stop ids)."""
    return int(token) in self.grammar.end_ids

  @property
  def done(self) -> bool:
    return self._matcher.is_stopped() or self._matcher.is_error()

  @property
  def error(self) -> str | None:
    return _first_line(self._matcher.get_error()) if self._matcher.is_error() else None


def compile_response_format(response_format: dict[str, Any] | None, tokenizer, vocab_size: int) -> Grammar | None:
  """The Grammar for a request's response_format (None for text); GrammarError names what is wrong."""
  source = grammar_source(response_format)
  if source is None:
    return None
  return Grammar(source, guidance_tokenizer(tokenizer, vocab_size), vocab_size)


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, tokenizer, vocab_size: int) -> Grammar:
  """The grammar of a forced tool call's text after the prefix the server writes into the prompt.

  `name` given (tool_choice names a function): the prompt already ends in `{"name": NAME, "parameters": `, so
  the text is the function's parameters object (its JSON Schema) and the closing brace. `name` None
  (tool_choice "required"): the prompt ends in the plugin channel's opening, and the text is one call
  `{"name": ..., "parameters": {...}}` of any of the tools. The model can then only answer with a well-formed
  call that fits the declared schema, which is what OpenAI's strict tools and vLLM's forced tool choice give."""
  llg = _llguidance()

  def schema_of(tool):
    function = tool.get("function", tool)
    schema = function.get("parameters") or {"type": "object"}
    return function["name"], schema

  try:
    if name is not None:
      (_, schema), = [schema_of(t) for t in tools if schema_of(t)[0] == name]
      options = {**_JSON_OPTIONS, "lenient": True}  # tools are not "strict": skip keywords it cannot enforce
      source = "start: params \"}\"\nparams: %json " + json.dumps({**schema, "x-guidance": options})
    else:
      calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": p},
                "required": ["name", "parameters"], "additionalProperties": False}
               for n, p in map(schema_of, tools)]
      source = llg.LLMatcher.grammar_from_json_schema({"anyOf": calls}, defaults={**_JSON_OPTIONS, "lenient": True})
    return Grammar(source, guidance_tokenizer(tokenizer, vocab_size), vocab_size)
  except (GrammarError, ValueError, TypeError) as e:
    raise GrammarError(f"tools: a function's parameters are not a JSON Schema this server can enforce: {e}") from None


def all_allowed(vocab_size: int) -> np.ndarray:
  """The [W] bitmask of an unguided slot."""
  return np.full((-(-int(vocab_size) // 32),), 0xFFFFFFFF, np.uint32)


def _first_line(message: str) -> str:
  lines = [line.strip() for line in (message or "unknown error").splitlines() if line.strip()]
  return " ".join(lines)[:300]
