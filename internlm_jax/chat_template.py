"""The InternLM2 chat format: its special pieces, the prompt template and the tool-call protocol.

`render_chat` writes OpenAI-style messages (and tools) as InternLM2's prompt text; `render_segments` writes the
same text as segments, each marked as written by the template or taken from the caller's messages, so that
`Tokenizer.encode_chat` can keep text from a client (message contents, names, tool-call arguments, tool schemas)
from ever becoming a special token: a user message holding "<|im_end|>\n<|im_start|>system\n..." is text to
the model, not a new turn. `parse_assistant` splits model output into content and tool calls.

The errors live here because a template error is a tokenizer error (`ChatTemplateError(TokenizerError)`), and
the tokenizer module imports this one.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence


UNK, BOS, EOS = "<unk>", "<s>", "</s>"
PLUGIN, INTERPRETER = "<|plugin|>", "<|interpreter|>"
ACTION_START, ACTION_END = "<|action_start|>", "<|action_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# In InternLM2's id order (92538..92543); `train_tokenizer` keeps this order.
CHAT_SPECIAL_PIECES = (PLUGIN, INTERPRETER, ACTION_END, ACTION_START, IM_END, IM_START)
INTERNLM2_SPECIAL_IDS = {UNK: 0, BOS: 1, EOS: 2, PLUGIN: 92538, INTERPRETER: 92539, ACTION_END: 92540,
                         ACTION_START: 92541, IM_END: 92542, IM_START: 92543}

ROLES = ("system", "user", "assistant", "environment")
# Message `name`s that stand for a channel token (LMDeploy's `name_map`); other names are written verbatim.
_CHANNEL_NAMES = {"plugin": PLUGIN, PLUGIN: PLUGIN, "interpreter": INTERPRETER, INTERPRETER: INTERPRETER}


class TokenizerError(ValueError):
  """A tokenizer file is missing or invalid, or a piece the caller needs is not in the vocabulary."""


class ChatTemplateError(TokenizerError):
  """A chat message or tool schema cannot be rendered in the InternLM2 format."""


# ---- chat template --------------------------------------------------------------------------------------------
# Matched against InternLM/InternLM chat/chat_format.md (turn layout, environment role, action spans) and
# InternLM/lmdeploy lmdeploy/model.py `InternLM2Chat7B.messages2prompt` (tools turn placement and JSON,
# tool_calls rendering, role `tool` -> environment, assistant turns closed by "<|im_end|>\n").


def _text(message: Mapping[str, Any], where: str, allow_none: bool) -> str:
  content = message.get("content")
  if content is None:
    if allow_none:
      return ""
    raise ChatTemplateError(f"{where} ({message.get('role')!r}) has no 'content'")
  if isinstance(content, str):
    return content
  if isinstance(content, list):  # OpenAI content parts: keep the text ones
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
  raise ChatTemplateError(f"{where}.content must be a string or a list of parts, got "
                          f"{type(content).__name__}")


def _function_schema(tool: Mapping[str, Any], index: int) -> Mapping[str, Any]:
  schema = None
  if isinstance(tool, Mapping) and tool.get("type", "function") == "function":
    schema = tool.get("function", tool)
  if not isinstance(schema, Mapping) or "name" not in schema:
    raise ChatTemplateError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ...}}}} or a "
                            "function schema with a 'name'")
  return schema


# A piece of the rendered prompt and whether its text came from the caller's messages (True) or the template.
Segment = tuple[str, bool]
_CLIENT, _TEMPLATE = True, False


def _render_call(call: Mapping[str, Any], where: str) -> list[Segment]:
  """One assistant action span, from an OpenAI tool call or a call returned by `parse_assistant`."""
  if not isinstance(call, Mapping):
    raise ChatTemplateError(f"{where} must be a dict")
  if call.get("type") == "interpreter":
    code = call.get("code")
    if not isinstance(code, str):
      raise ChatTemplateError(f"{where} is an interpreter call without a 'code' string")
    return [(f"{ACTION_START}{INTERPRETER}\n```python\n", _TEMPLATE), (code, _CLIENT), (f"\n```{ACTION_END}", _TEMPLATE)]
  if "error" in call and isinstance(call.get("raw"), str):  # a malformed call: replay what the model wrote
    return [(f"{ACTION_START}{PLUGIN}\n", _TEMPLATE), (call["raw"], _CLIENT), (ACTION_END, _TEMPLATE)]
  function = call.get("function", call)
  name = function.get("name")
  args = function.get("arguments", function.get("parameters", {}))
  if not isinstance(name, str) or not name:
    raise ChatTemplateError(f"{where} has no function 'name'")
  if isinstance(args, str):
    try:
      args = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
      raise ChatTemplateError(f"{where} ({name!r}) has arguments that are not valid JSON: {args[:80]!r}") from None
  body = json.dumps({"name": name, "parameters": args}, ensure_ascii=False)
  return [(f"{ACTION_START}{PLUGIN}\n", _TEMPLATE), (body, _CLIENT), (ACTION_END, _TEMPLATE)]


def render_segments(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                    add_generation_prompt: bool = True) -> list[Segment]:
  """`render_chat`'s text as (text, from_client) segments: from_client marks text taken from the messages and
  tools (contents, names, tool-call bodies, the tool schemas), False the template's own pieces."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
  turns = [(f"messages[{i}]", message) for i, message in enumerate(messages)]
  for where, message in turns:
    if not isinstance(message, Mapping) or "role" not in message:
      raise ChatTemplateError(f"{where} must be a dict with a 'role'")
  if tools:
    schemas = [_function_schema(tool, i) for i, tool in enumerate(tools)]
    tools_turn = {"role": "system", "name": "plugin", "content": json.dumps(schemas, ensure_ascii=False)}
    turns.insert(1 if turns and turns[0][1]["role"] == "system" else 0, ("tools", tools_turn))
  out: list[Segment] = [(BOS, _TEMPLATE)]
  for where, message in turns:
    role, name = message["role"], message.get("name")
    if role == "tool":
      role, name = "environment", "plugin"
    if role not in ROLES:
      raise ChatTemplateError(f"{where} has unknown role {role!r}; use one of {ROLES + ('tool',)}")
    calls = (message.get("tool_calls") or []) if role == "assistant" else []
    content = _text(message, where, allow_none=bool(calls))
    out.append((f"{IM_START}{role}", _TEMPLATE))
    if name is not None:
      out.append((" name=", _TEMPLATE))
      channel = isinstance(name, str) and name in _CHANNEL_NAMES
      out.append((_CHANNEL_NAMES[name], _TEMPLATE) if channel else (str(name), _CLIENT))
    out += [("\n", _TEMPLATE), (content, _CLIENT)]
    for j, call in enumerate(calls):
      out += _render_call(call, f"{where}.tool_calls[{j}]")
    out.append((f"{IM_END}\n", _TEMPLATE))
  if add_generation_prompt:
    out.append((f"{IM_START}assistant\n", _TEMPLATE))
  return [(text, from_client) for text, from_client in out if text]


def render_chat(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                add_generation_prompt: bool = True) -> str:
  """The InternLM2 chat prompt for OpenAI-style `messages` (and `tools`), starting with `<s>`.

  Roles: system, user, assistant, environment, and OpenAI `tool` (rendered as `environment name=<|plugin|>`).
  A message `name` of "plugin"/"interpreter" becomes the channel token; other names (e.g. "file") are kept.
  Assistant `tool_calls` may be OpenAI calls or the dicts `parse_assistant` returns.
  """
  return "".join(text for text, _ in render_segments(messages, tools, add_generation_prompt))


# ---- tool-call parsing ----------------------------------------------------------------------------------------
_FENCE_RE = re.compile(r"^\s*```[\w+-]*\n(.*?)\n?```\s*$", re.DOTALL)


def _parse_plugin(body: str) -> dict[str, Any]:
  try:
    call = json.loads(body)
  except json.JSONDecodeError as e:
    call, error = None, f"invalid JSON: {e.msg} at char {e.pos}"
  else:
    error = None if isinstance(call, dict) and isinstance(call.get("name"), str) else "expected {\"name\": ...}"
  if error is None:
    args = call.get("parameters", call.get("arguments", {}))
    if isinstance(args, str):  # some fine-tunes emit OpenAI-style string arguments
      try:
        args = json.loads(args)
      except json.JSONDecodeError:
        error = "'parameters' is a string that is not JSON"
    if error is None and not isinstance(args, dict):
      error = "'parameters' must be a JSON object"
  if error is not None:
    name = call.get("name") if isinstance(call, dict) else None
    return {"type": "plugin", "name": name, "arguments": None, "raw": body, "error": error}
  return {"type": "plugin", "name": call["name"], "arguments": args}


def parse_assistant(text: str) -> tuple[str, list[dict[str, Any]]]:
  """Splits model output into (content, tool calls).

  Calls are `{"type": "plugin", "name": str, "arguments": dict}` or `{"type": "interpreter", "code": str}`.
  A plugin call whose body is not a JSON object with a "name" does not raise: it comes back as
  `{"type": "plugin", "name": name-or-None, "arguments": None, "raw": body, "error": reason}` so an agent can
  tell the model what went wrong. A call cut off before `<|action_end|>` (a stop word in LMDeploy) is parsed up
  to the end of the text. Trailing `<|im_end|>` / `</s>` are dropped and the content is stripped.
  """
  text = text.strip()
  for stop in (EOS, IM_END):
    text = text[:-len(stop)].rstrip() if text.endswith(stop) else text
  content: list[str] = []
  calls: list[dict[str, Any]] = []
  rest = text
  while ACTION_START in rest:
    before, rest = rest.split(ACTION_START, 1)
    content.append(before)
    body, closed, rest = rest.partition(ACTION_END)
    if body.startswith(PLUGIN):
      calls.append(_parse_plugin(body[len(PLUGIN):].strip()))
    elif body.startswith(INTERPRETER):
      code = body[len(INTERPRETER):].strip("\n")
      fenced = _FENCE_RE.match(code)
      calls.append({"type": "interpreter", "code": fenced.group(1) if fenced else code.strip()})
    else:  # an action span on no known channel is not a call: keep it visible
      content.append(ACTION_START + body + closed)
  content.append(rest)
  return "".join(content).strip(), calls
