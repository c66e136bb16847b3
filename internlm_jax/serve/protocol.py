"""OpenAI wire format: request models (pydantic), errors, and the builders of logprobs and tool-call fields.

Requests reject unknown fields (a typo must not be silently ignored) and parameters we do not implement
(suffix, non-text content parts) with a 400 that names the parameter, rather than answering something the client
did not ask for. A null optional field means its default, as in OpenAI's API.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from internlm_jax.serve.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from internlm_jax.serve.scheduler import TokenInfo

MAX_N = 16  # choices per prompt (n, best_of): each is a sequence of its own in the scheduler


class APIError(Exception):
  """An error answered as OpenAI JSON: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict[str, Any]:
    return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
  return {"object": "error", "error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")

  @model_validator(mode="before")
  @classmethod
  def _null_means_default(cls, data: Any) -> Any:
    # OpenAI documents every optional field as nullable, and some clients send null for "not set"
    # ("n": null, "stream": null): read that as the default, not as a type error.
    if isinstance(data, dict):
      fields = cls.model_fields
      return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
    return data


class StreamOptions(_Strict):
  include_usage: bool = False


class ResponseFormat(_Strict):
  """OpenAI's response_format ("text", "json_object", "json_schema" with json_schema {name, schema, strict,
  description}) and LMDeploy's "regex_schema"; guided.py compiles it."""
  type: str
  json_schema: dict[str, Any] | None = None
  regex_schema: str | None = None

  def as_dict(self) -> dict[str, Any]:
    return self.model_dump(exclude_none=True)


class _Common(_Strict):
  model: str
  max_tokens: int | None = Field(None, ge=0)
  temperature: float | None = Field(None, ge=0, le=100)
  top_p: float | None = Field(None, gt=0, le=1)
  top_k: int | None = Field(None, ge=-1)
  min_p: float | None = Field(None, ge=0, le=1)
  repetition_penalty: float | None = Field(None, gt=0, le=10)
  presence_penalty: float | None = Field(None, ge=-2, le=2)
  frequency_penalty: float | None = Field(None, ge=-2, le=2)
  stop: Union[str, list[str], None] = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool = False
  skip_special_tokens: bool = True
  seed: int | None = Field(None, ge=0, lt=2 ** 63)
  n: int = Field(1, ge=1)
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None
  logit_bias: dict[str, float] | None = None
  response_format: ResponseFormat | None = None
  min_tokens: int | None = Field(None, ge=0)

  def check_supported(self) -> None:
    if self.n > MAX_N:
      raise APIError(400, f"n must be at most {MAX_N}, got {self.n}", param="n")
    _check_logit_bias(self.logit_bias or {})
    if self.stream_options is not None and not self.stream:
      raise APIError(400, "stream_options needs stream=true", param="stream_options")

  def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
               extra_stop_ids: tuple[int, ...] = (), skip_special_tokens: bool | None = None,
               grammar: Any = None, adapter: int = 0) -> SamplingParams:
    stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
        top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p, min_p=self.min_p or 0.0,
        repetition_penalty=self.repetition_penalty or 1.0, presence_penalty=self.presence_penalty or 0.0,
        frequency_penalty=self.frequency_penalty or 0.0,
        logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()), stop=stop,
        stop_token_ids=tuple(self.stop_token_ids or ()) + extra_stop_ids, ignore_eos=self.ignore_eos,
        seed=self.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs, grammar=grammar, adapter=adapter,
        min_tokens=self.min_tokens or 0,
        skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens)


class CompletionRequest(_Common):
  prompt: Union[str, list[str], list[int], list[list[int]]]
  echo: bool = False
  logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
  suffix: str | None = None
  best_of: int | None = Field(None, ge=1)

  def check_supported(self) -> None:
    super().check_supported()
    if self.best_of is not None:
      if not self.n <= self.best_of <= MAX_N:
        raise APIError(400, f"best_of must be in [n, {MAX_N}] (n={self.n}), got {self.best_of}", param="best_of")
      if self.stream and self.best_of > self.n:  # the best are known only once all have finished
        raise APIError(400, "best_of > n cannot be streamed", param="best_of")
    if self.suffix:
      raise APIError(400, "suffix is not supported", param="suffix")


class FunctionName(_Strict):
  name: str


class NamedToolChoice(_Strict):
  type: Literal["function"] = "function"
  function: FunctionName


class EncodeRequest(_Strict):
  """LMDeploy's /v1/encode: token ids of text (or of each text), with `do_preprocess` the text as one user turn
  through the chat template (what a chat request's prompt would be)."""
  input: Union[str, list[str]]
  do_preprocess: bool = False
  add_bos: bool = True


class ChatRequest(_Common):
  messages: list[dict[str, Any]] = Field(min_length=1)
  tools: list[dict[str, Any]] | None = None
  tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
  parallel_tool_calls: bool | None = None
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
  max_completion_tokens: int | None = Field(None, ge=0)

  def check_supported(self) -> None:
    super().check_supported()
    if self.top_logprobs is not None and not self.logprobs:
      raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if (self.response_format is not None and self.response_format.type != "text"
        and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))):
      raise APIError(400, "response_format shapes the message content; it cannot be combined with a tool_choice "
                     "that forces a tool call", param="response_format")
    if self.tool_choice not in (None, "none") and not self.tools:
      raise APIError(400, "tool_choice needs tools", param="tool_choice")
    _check_content_parts(self.messages)
    _check_tools(self.tools or [])
    # OpenAI's newer clients send the system prompt as role "developer"; the template knows it as system.
    self.messages = [dict(m, role="system") if isinstance(m, dict) and m.get("role") == "developer" else m
                     for m in self.messages]


def _check_content_parts(messages: list[dict[str, Any]]) -> None:
  """The model reads text only: an image or audio part (or a malformed one) would otherwise be dropped from
  the prompt without a word, and the model would answer as if it had seen it."""
  for i, message in enumerate(messages):
    content = message.get("content")
    if not isinstance(content, list):
      continue  # strings, None and wrong types are checked when the prompt is rendered
    for j, part in enumerate(content):
      where = f"messages[{i}].content[{j}]"
      if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise APIError(400, f"{where} must be a content part {{'type': 'text', 'text': ...}}", param="messages")
      if part["type"] != "text":
        raise APIError(400, f"{where} is a {part['type']!r} part; this model takes only 'text' parts",
                       param="messages")
      if not isinstance(part.get("text"), str):
        raise APIError(400, f"{where} has no 'text' string", param="messages")


_TOKEN_ID = re.compile(r"[0-9]{1,10}")  # bounded: int() refuses strings of over 4300 digits


def _check_logit_bias(bias: dict[str, float]) -> None:
  """OpenAI's logit_bias: token id strings -> a bias in [-100, 100], at most MAX_LOGIT_BIAS entries. Whether an id
  lies in the vocabulary is SamplingParams.validate's check (the engine knows the vocabulary)."""
  if len(bias) > MAX_LOGIT_BIAS:
    raise APIError(400, f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
  ids = set()
  for key, value in bias.items():
    if not _TOKEN_ID.fullmatch(key):
      raise APIError(400, f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                     param="logit_bias")
    if not -100.0 <= value <= 100.0:  # NaN fails too
      raise APIError(400, f"logit_bias values must be in [-100, 100], got {value} for token {key}",
                     param="logit_bias")
    if int(key) in ids:  # "7" and "07"
      raise APIError(400, f"logit_bias names token {int(key)} twice", param="logit_bias")
    ids.add(int(key))


def _check_tools(tools: list[dict[str, Any]]) -> None:
  """OpenAI rejects a malformed function schema; rendered into the prompt as it is, it would only confuse the
  model (the tokenizer also takes bare function schemas, as LMDeploy does)."""
  for i, tool in enumerate(tools):
    if tool.get("type", "function") != "function":
      raise APIError(400, f"tools[{i}].type must be 'function', got {tool.get('type')!r}", param="tools")
    function = tool.get("function", tool)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
      raise APIError(400, f"tools[{i}].function must be an object with a non-empty 'name' string", param="tools")
    if not isinstance(function.get("parameters", {}), dict):
      raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object, got "
                     f"{type(function['parameters']).__name__}", param="tools")


# ---- response pieces ------------------------------------------------------------------------------------------
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
  """Text of single tokens for logprobs fields (ids past the tokenizer's vocabulary show as '')."""

  def __init__(self, tokenizer):
    self._tok, self._cache = tokenizer, {}

  def bytes(self, token_id: int) -> list[int]:
    """The token's UTF-8 bytes. A byte-fallback piece (`<0xF0>`, part of an emoji) is one raw byte: its text
    alone is U+FFFD, and clients rebuild such characters from these bytes, as OpenAI's field is meant for."""
    text = self(token_id)
    if text == "\ufffd":
      match = _BYTE_PIECE.fullmatch(self._tok.id_to_token(token_id))
      if match:
        return [int(match.group(1), 16)]
    return list(text.encode("utf-8"))

  def __call__(self, token_id: int) -> str:
    text = self._cache.get(token_id)
    if text is None:
      ok = 0 <= token_id < self._tok.vocab_size
      text = self._cache[token_id] = self._tok.decode([token_id]) if ok else ""
    return text


def completion_logprobs(tokens: list[TokenInfo], token_text: TokenText, first_has_none: bool = False,
                        offset: int = 0) -> dict[str, list]:
  """The legacy completions `logprobs` object; with echo the first prompt token has no logprob (None)."""
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for i, info in enumerate(tokens):
    text = token_text(info.token_id)
    out["tokens"].append(text)
    out["text_offset"].append(offset)
    offset += len(text)
    if first_has_none and i == 0:
      out["token_logprobs"].append(None)
      out["top_logprobs"].append(None)
      continue
    out["token_logprobs"].append(info.logprob)
    top = {}
    for tid, lp in info.top or []:
      top.setdefault(token_text(tid), lp)
    out["top_logprobs"].append(top)
  return out


def chat_logprobs(tokens: list[TokenInfo], token_text: TokenText) -> dict[str, list]:
  def entry(tid, lp):
    text = token_text(tid)
    return {"token": text, "logprob": lp, "bytes": token_text.bytes(tid)}
  return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or []]}
                      for t in tokens]}


def openai_tool_calls(calls: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
  """OpenAI `tool_calls` from `parse_assistant` calls, plus the raw text of malformed ones (kept as content).

  An interpreter call becomes a call of the function "interpreter" with arguments {"code": ...}.
  """
  out, leftover = [], []
  for call in calls:
    if call.get("error"):
      leftover.append(call.get("raw", ""))
      continue
    if call["type"] == "interpreter":
      name, args = "interpreter", {"code": call["code"]}
    else:
      name, args = call["name"], call["arguments"]
    out.append({"id": new_id("call"), "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
  return out, "\n".join(leftover)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}
