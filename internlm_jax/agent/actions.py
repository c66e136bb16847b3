"""The action API: tools from Python functions or classes, their JSON schemas, argument checks, and results.

A tool is a function (or a `Toolkit` method marked `@tool_api`). Its schema comes from the signature's type hints
and the Google-style docstring (summary line, `Args:`, `Returns:`), in the OpenAI function format that both the
InternLM2 plugin system turn and OpenAI `tools=` take:
  {"name": ..., "description": ..., "parameters": {"type": "object", "properties": {...}, "required": [...]}}

Calling a tool never raises into the agent loop: bad arguments come back as status "args_error" and exceptions
inside the tool as "tool_error", each with a one-line message the model can act on (Lagent's ActionStatusCode
ARGS_ERROR / API_ERROR).
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import re
import time
import types
import typing
from typing import Any, Callable, Iterable, Mapping

SUCCESS, ARGS_ERROR, TOOL_ERROR = "success", "args_error", "tool_error"
STATUSES = (SUCCESS, ARGS_ERROR, TOOL_ERROR)
MAX_RESULT_CHARS = 8000  # what one observation may add to the prompt


@dataclasses.dataclass
class ActionResult:
  """What one tool call produced. `parts` are {"type": "text", "content": str} or {"type": "image", "path": str}."""
  tool: str | None
  args: Any
  status: str = SUCCESS
  parts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  error: str | None = None
  duration_s: float = 0.0

  @property
  def ok(self) -> bool:
    return self.status == SUCCESS

  def text(self, limit: int = MAX_RESULT_CHARS) -> str:
    """The observation shown to the model: text parts, one line per image, then the error if any."""
    lines = [p["content"] if p["type"] == "text" else f"[image saved: {p['path']}]" for p in self.parts]
    if not self.ok:
      lines.append(f"[{self.status}] {self.error}")
    out = "\n".join(lines) if lines else "(no output)"
    return out if len(out) <= limit else out[:limit] + f"\n... [truncated {len(out) - limit} chars]"

  @property
  def images(self) -> list[str]:
    return [p["path"] for p in self.parts if p["type"] == "image"]

  def to_dict(self) -> dict[str, Any]:
    return {"tool": self.tool, "args": self.args, "status": self.status, "parts": self.parts,
            "error": self.error, "duration_s": round(self.duration_s, 4)}


def text_part(text: str) -> dict[str, Any]:
  return {"type": "text", "content": text}


def image_part(path: str) -> dict[str, Any]:
  return {"type": "image", "path": path}


def to_parts(value: Any) -> list[dict[str, Any]]:
  """A tool's return value as result parts: parts pass through, strings stay, everything else becomes JSON."""
  if isinstance(value, dict) and value.get("type") in ("text", "image"):
    return [value]
  if isinstance(value, list) and value and all(isinstance(v, dict) and v.get("type") in ("text", "image")
                                               for v in value):
    return list(value)
  if value is None:
    return []
  if isinstance(value, str):
    return [text_part(value)]
  try:
    return [text_part(json.dumps(value, ensure_ascii=False, default=str))]
  except (TypeError, ValueError):
    return [text_part(repr(value))]


# ---- schema from type hints and docstrings --------------------------------------------------------------------
_SECTION_RE = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?):\s*$")
_ARG_RE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str], str]:
  """(description, {arg: description}, returns) from a Google-style docstring."""
  lines = inspect.cleandoc(doc or "").splitlines()
  summary: list[str] = []
  args: dict[str, str] = {}
  returns: list[str] = []
  section, current, indent = None, None, None
  for line in lines:
    header = _SECTION_RE.match(line)
    if header:
      section, current, indent = header.group(1), None, None
      continue
    if section is None:
      summary.append(line)
    elif section in ("Args", "Arguments", "Parameters") and line.strip():
      this_indent = len(line) - len(line.lstrip())
      match = _ARG_RE.match(line)
      if match and (indent is None or this_indent <= indent):  # a new "name (type): text" entry
        indent, current = this_indent, match.group(1).lstrip("*")
        args[current] = match.group(3).strip()
      elif current is not None:  # a continuation line of the current entry
        args[current] = (args[current] + " " + line.strip()).strip()
    elif section in ("Returns", "Return") and line.strip():
      returns.append(line.strip())
  description = " ".join(" ".join(summary).split())
  return description, args, " ".join(returns)


def json_type(hint: Any) -> tuple[dict[str, Any], bool]:
  """(JSON schema, optional) for a type hint; `X | None` and `Optional[X]` are optional."""
  origin, hargs = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    rest = [a for a in hargs if a is not type(None)]
    if len(rest) == 1:
      return json_type(rest[0])[0], len(rest) < len(hargs)
    return {"anyOf": [json_type(a)[0] for a in rest]}, len(rest) < len(hargs)
  if origin is typing.Literal:
    kinds = {type(a) for a in hargs}
    schema = json_type(kinds.pop())[0] if len(kinds) == 1 else {}
    return {**schema, "enum": list(hargs)}, False
  if origin in (list, tuple, set, frozenset, Iterable, typing.Sequence) or hint in (list, tuple):
    item = json_type(hargs[0])[0] if hargs and hargs[0] is not Ellipsis else {}
    return ({"type": "array", "items": item} if item else {"type": "array"}), False
  if origin in (dict, Mapping) or hint is dict:
    return {"type": "object"}, False
  if isinstance(hint, type) and issubclass(hint, enum.Enum):
    return {"type": "string", "enum": [m.value for m in hint]}, False
  simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
  if hint in simple:
    return {"type": simple[hint]}, False
  return {}, False  # Any or an unknown class: accept any JSON value


def function_schema(fn: Callable, name: str | None = None, description: str | None = None) -> dict[str, Any]:
  """The OpenAI-style function schema of `fn` (self/cls, *args and **kwargs are not parameters)."""
  sig = inspect.signature(fn)
  try:
    hints = typing.get_type_hints(fn)
  except Exception:  # unresolvable forward references: fall back to no hints rather than fail registration
    hints = {}
  summary, arg_docs, returns = parse_docstring(fn.__doc__)
  properties: dict[str, Any] = {}
  required: list[str] = []
  for pname, param in sig.parameters.items():
    if pname in ("self", "cls") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
      continue
    schema, optional = json_type(hints.get(pname, Any))
    if arg_docs.get(pname):
      schema = {**schema, "description": arg_docs[pname]}
    if param.default is not param.empty:
      if isinstance(param.default, (str, int, float, bool)):
        schema["default"] = param.default
    elif not optional:
      required.append(pname)
    properties[pname] = schema
  fn_name = getattr(fn, "__name__", type(fn).__name__)
  text = description or summary or (fn_name + " tool")
  if returns and not description:
    text += f" Returns: {returns}"
  return {"name": name or fn_name, "description": text,
          "parameters": {"type": "object", "properties": properties, "required": required}}


# ---- argument checking ----------------------------------------------------------------------------------------
class ArgumentError(ValueError):
  """The model's arguments do not fit the tool's schema."""


def _check_value(value: Any, schema: Mapping[str, Any], where: str) -> Any:
  """`value` checked against a (small subset of) JSON schema; numbers written as strings are converted,
  because small models often quote them."""
  if "anyOf" in schema:
    for option in schema["anyOf"]:
      try:
        return _check_value(value, option, where)
      except ArgumentError:
        pass
    raise ArgumentError(f"{where} does not match any of the allowed types")
  kind = schema.get("type")
  if kind == "integer":
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
      value = int(value)
    elif isinstance(value, float) and value.is_integer():
      value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      raise ArgumentError(f"{where} must be an integer, got {value!r}")
  elif kind == "number":
    if isinstance(value, str):
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ArgumentError(f"{where} must be a number, got {value!r}")
  elif kind == "string" and not isinstance(value, str):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      value = str(value)
    else:
      raise ArgumentError(f"{where} must be a string, got {type(value).__name__}")
  elif kind == "boolean" and not isinstance(value, bool):
    if value in ("true", "false"):
      value = value == "true"
    else:
      raise ArgumentError(f"{where} must be true or false, got {value!r}")
  elif kind == "array":
    if not isinstance(value, list):
      raise ArgumentError(f"{where} must be a list, got {type(value).__name__}")
    if schema.get("items"):
      value = [_check_value(v, schema["items"], f"{where}[{i}]") for i, v in enumerate(value)]
  elif kind == "object" and not isinstance(value, dict):
    raise ArgumentError(f"{where} must be an object, got {type(value).__name__}")
  if "enum" in schema and value not in schema["enum"]:
    raise ArgumentError(f"{where} must be one of {schema['enum']}, got {value!r}")
  return value


def check_arguments(schema: Mapping[str, Any], args: Any) -> dict[str, Any]:
  """Validated keyword arguments for a function schema; raises ArgumentError with a one-line reason."""
  params = list(schema["parameters"]["properties"])
  if isinstance(args, str):  # a JSON string (OpenAI) or, for one-parameter tools, the bare value (ReAct)
    try:
      args = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
      pass  # not JSON: the raw text is the value of a lone parameter
    if not isinstance(args, dict) and len(params) == 1:
      args = {params[0]: args}
  if not isinstance(args, dict):
    raise ArgumentError(f"arguments must be a JSON object with keys {params}, got {str(args)[:80]!r}")
  props = schema["parameters"]["properties"]
  unknown = sorted(set(args) - set(props))
  if unknown:
    raise ArgumentError(f"unknown argument(s) {unknown}; {schema['name']} takes {sorted(props)}")
  missing = [p for p in schema["parameters"].get("required", []) if p not in args]
  if missing:
    raise ArgumentError(f"missing required argument(s) {missing} for {schema['name']}")
  return {k: _check_value(v, props[k], f"argument {k!r}") for k, v in args.items()}


# ---- tools and toolkits ---------------------------------------------------------------------------------------
class Tool:
  """One callable API with a schema. Calling it returns an ActionResult and never raises."""

  def __init__(self, fn: Callable, name: str | None = None, description: str | None = None,
               schema: dict[str, Any] | None = None):
    if not callable(fn):
      raise TypeError(f"a tool needs a callable, got {type(fn).__name__}")
    self.fn = fn
    # An explicit schema is for tools whose signature lives elsewhere (a remote tool server).
    self.schema = schema or function_schema(fn, name=name, description=description)
    self.name = self.schema["name"]
    if not re.fullmatch(r"[A-Za-z_][\w.-]*", self.name):
      raise ValueError(f"tool name {self.name!r} must be letters, digits, '_', '-' or '.'")

  @property
  def description(self) -> str:
    return self.schema["description"]

  def __call__(self, args: Any = None) -> ActionResult:
    start = time.perf_counter()
    result = ActionResult(self.name, args)
    try:
      kwargs = check_arguments(self.schema, {} if args is None else args)
    except ArgumentError as e:
      result.status, result.error = ARGS_ERROR, str(e)
    else:
      try:
        value = self.fn(**kwargs)
      except Exception as e:  # a tool failure is an observation for the model, not a crash of the loop
        result.status, result.error = TOOL_ERROR, f"{type(e).__name__}: {e}".splitlines()[0][:500]
      else:
        if isinstance(value, ActionResult):
          value.tool, value.args = self.name, args
          result = value
        else:
          result.parts = to_parts(value)
    result.duration_s = time.perf_counter() - start
    return result

  def __repr__(self) -> str:
    return f"Tool({self.name!r})"


def make_tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
  """A Tool from a function (AgentLego's `make_tool`); usable as `@make_tool` or `@make_tool(name=...)`."""
  if fn is None:
    return lambda f: Tool(f, name=name, description=description)
  return Tool(fn, name=name, description=description)


def tool_api(fn: Callable) -> Callable:
  """Marks a Toolkit method as one of its APIs."""
  fn._tool_api = True
  return fn


class Toolkit:
  """Several related APIs sharing state (e.g. one interpreter session). Subclasses mark methods `@tool_api`;
  each becomes a tool named `{toolkit name}.{method}` (Lagent's `Tool.api`), except that a lone `run` API is
  named after the toolkit. `setup()` runs once before the
  first call (for heavy resources, as AgentLego's lazy setup); `close()` releases them."""

  name: str | None = None

  def __init__(self, name: str | None = None):
    self.name = name or self.name or type(self).__name__
    self._ready = False
    methods = [getattr(self, a) for a in dir(type(self)) if getattr(getattr(type(self), a), "_tool_api", False)]
    if not methods:
      raise TypeError(f"{type(self).__name__} has no @tool_api methods")
    # A toolkit whose only API is `run` is one tool named after the toolkit (Lagent's single-API actions).
    single = len(methods) == 1 and methods[0].__name__ == "run"
    self._tools = {m.__name__: Tool(self._lazy(m), name=self.name if single else f"{self.name}.{m.__name__}")
                   for m in methods}

  def _lazy(self, method: Callable) -> Callable:
    def call(**kwargs):
      if not self._ready:
        self.setup()
        self._ready = True
      return method(**kwargs)
    call.__signature__ = inspect.signature(method)  # the schema must see the method's parameters, not **kwargs
    call.__doc__, call.__name__ = method.__doc__, method.__name__
    try:
      call.__annotations__ = typing.get_type_hints(method)
    except Exception:  # unresolvable hints: the schema falls back to untyped parameters
      pass
    return call

  def setup(self) -> None:
    pass

  def close(self) -> None:
    pass

  def tools(self) -> list[Tool]:
    return list(self._tools.values())


def as_tools(items: Iterable[Tool | Toolkit | Callable]) -> list[Tool]:
  """Flattens tools, toolkits and plain functions into a list of Tools."""
  out: list[Tool] = []
  for item in items:
    if isinstance(item, Tool):
      out.append(item)
    elif isinstance(item, Toolkit):
      out.extend(item.tools())
    elif hasattr(item, "run") and callable(item.run):  # a Lagent-style class: one `run` API, named after the class
      doc = parse_docstring(type(item).__doc__)[0]
      out.append(Tool(item.run, name=getattr(item, "name", None) or type(item).__name__, description=doc or None))
    elif callable(item):
      out.append(Tool(item))
    else:
      raise TypeError(f"cannot make a tool from {type(item).__name__}")
  return out


class ActionExecutor:
  """The tools an agent may call, by name. `__call__(name, args)` always returns an ActionResult."""

  def __init__(self, tools: Iterable[Tool | Toolkit | Callable] = ()):
    tools = list(tools)
    self.toolkits = [t for t in tools if isinstance(t, Toolkit)]
    self.tools: dict[str, Tool] = {}
    for tool in as_tools(tools):
      if tool.name in self.tools:
        raise ValueError(f"two tools are named {tool.name!r}; give one a different name")
      self.tools[tool.name] = tool

  def __contains__(self, name: str) -> bool:
    return name in self.tools

  def __len__(self) -> int:
    return len(self.tools)

  def schemas(self) -> list[dict[str, Any]]:
    return [t.schema for t in self.tools.values()]

  def describe(self) -> str:
    """One block per tool for text prompts (ReAct, ReWOO): name, description, JSON parameters."""
    blocks = []
    for tool in self.tools.values():
      params = json.dumps(tool.schema["parameters"], ensure_ascii=False)
      blocks.append(f"{tool.name}: {tool.description}\n  Parameters: {params}")
    return "\n".join(blocks)

  def __call__(self, name: str | None, args: Any = None) -> ActionResult:
    if name not in self.tools:
      return ActionResult(name, args, ARGS_ERROR,
                          error=f"unknown tool {name!r}; available tools: {sorted(self.tools)}")
    return self.tools[name](args)

  def close(self) -> None:
    for kit in self.toolkits:
      kit.close()
