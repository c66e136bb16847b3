"""Tool-calling protocols: how tools are offered to a model, how its calls are read, how results go back.

- NativeProtocol: InternLM2's own format (DESIGN.md), built on `tokenizer.render_chat` / `parse_assistant`:
  tools in a `system name=<|plugin|>` turn, the interpreter announced in a `system name=<|interpreter|>` turn,
  calls as `<|action_start|><|plugin|>{json}<|action_end|>` or `<|action_start|><|interpreter|>code...`,
  results as `environment` turns. For text backends (in-process model, scripted).
- OpenAIProtocol: OpenAI `tools=` / `tool_calls` / role `tool`, for any OpenAI-compatible endpoint.

Both produce ToolCalls; a malformed call carries `error` and is answered with an args_error result.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

from internlm_jax.agent.actions import ARGS_ERROR, ActionExecutor, ActionResult
from internlm_jax.agent.llm import Reply
from internlm_jax.tokenizer import ACTION_END, ACTION_START, parse_assistant

# Lagent's Internlm2Protocol interpreter prompt, in our words.
INTERPRETER_PROMPT = ("You can run Python in a stateful Jupyter-like session to compute, analyse data and draw "
                      "charts: write the code inside <|action_start|><|interpreter|> ... <|action_end|>. The "
                      "session has no network. Use it when a result needs exact computation.")
PLUGIN_HINT = ('To call a tool, write <|action_start|><|plugin|>\n{"name": "tool_name", "parameters": {...}}'
               "<|action_end|>; its result comes back in an environment turn.")


@dataclasses.dataclass
class ToolCall:
  name: str | None
  arguments: Any = None
  id: str | None = None
  kind: str = "plugin"  # "plugin" | "interpreter" | "function" (OpenAI)
  error: str | None = None  # why the call could not be read
  raw: Any = None  # the call as the protocol wrote it, replayed in the history


@dataclasses.dataclass
class Turn:
  content: str
  calls: list[ToolCall]


def malformed_result(call: ToolCall, hint: str) -> ActionResult:
  return ActionResult(call.name, call.arguments, ARGS_ERROR, error=f"malformed tool call ({call.error}). {hint}")


class NativeProtocol:
  """InternLM2 special-token protocol. `interpreter` names the executor tool that runs `<|interpreter|>` code
  (it takes {"code": ...}); that tool is announced in its own system turn, not in the plugin list."""

  name = "internlm2"
  stop = (ACTION_END,)  # as LMDeploy's Lagent client: stop after a call so the model cannot invent its result

  def __init__(self, interpreter: str | None = "python", interpreter_prompt: str = INTERPRETER_PROMPT):
    self.interpreter = interpreter
    self.interpreter_prompt = interpreter_prompt

  def request(self, system: str | None, history: list[dict], executor: ActionExecutor
              ) -> tuple[list[dict], list[dict] | None]:
    messages = [{"role": "system", "content": system}] if system else []
    if self.interpreter and self.interpreter in executor:
      messages.append({"role": "system", "name": "interpreter", "content": self.interpreter_prompt})
    plugins = [s for s in executor.schemas() if s["name"] != self.interpreter]
    if plugins and not system:
      messages.append({"role": "system", "content": PLUGIN_HINT})
    return messages + history, (plugins or None)

  def parse(self, reply: Reply) -> Turn:
    content, calls = parse_assistant(reply.text)
    out = []
    for call in calls:
      if call["type"] == "interpreter":
        out.append(ToolCall(self.interpreter, {"code": call["code"]}, kind="interpreter", raw=call))
      else:
        out.append(ToolCall(call.get("name"), call.get("arguments"), kind="plugin", error=call.get("error"), raw=call))
    return Turn(content, out)

  def assistant_message(self, turn: Turn) -> dict:
    message = {"role": "assistant", "content": turn.content}
    if turn.calls:
      message["tool_calls"] = [c.raw for c in turn.calls]
    return message

  def result_message(self, call: ToolCall, result: ActionResult) -> dict:
    return {"role": "environment", "name": "interpreter" if call.kind == "interpreter" else "plugin",
            "content": result.text()}

  def execute(self, call: ToolCall, executor: ActionExecutor) -> ActionResult | None:
    """A ready result for calls that cannot run (None: run it)."""
    if call.error:
      return malformed_result(call, f"Write {ACTION_START}<|plugin|>\n{{\"name\": ..., \"parameters\": "
                                    f"{{...}}}}{ACTION_END} with valid JSON.")
    if call.kind == "interpreter" and (self.interpreter is None or self.interpreter not in executor):
      return ActionResult(None, call.arguments, ARGS_ERROR, error="no code interpreter is available here")
    return None


def _api_name(name: str) -> str:
  """OpenAI function names allow only [A-Za-z0-9_-]; toolkit APIs are named "kit.api"."""
  return re.sub(r"[^A-Za-z0-9_-]", "__", name)


class OpenAIProtocol:
  """OpenAI function calling. If the endpoint returns no `tool_calls` but its text holds native InternLM2 action
  spans (a server without a tool parser), those are read instead, so our models work behind either. An
  interpreter call (our server returns it as the function "interpreter" with {"code": ...}) goes to the executor's
  `interpreter` tool."""

  name = "openai"
  stop = ()

  def __init__(self, interpreter: str | None = "python"):
    self.interpreter = interpreter
    self._names: dict[str, str] = {}
    self._count = 0

  def request(self, system: str | None, history: list[dict], executor: ActionExecutor
              ) -> tuple[list[dict], list[dict] | None]:
    self._names = {_api_name(s["name"]): s["name"] for s in executor.schemas()}
    if self.interpreter in executor and "interpreter" not in self._names:
      self._names["interpreter"] = self.interpreter
    tools = [{"type": "function", "function": {**s, "name": _api_name(s["name"])}} for s in executor.schemas()]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + history, (tools or None)

  def _id(self) -> str:
    self._count += 1
    return f"call_{self._count}"

  def parse(self, reply: Reply) -> Turn:
    if not reply.tool_calls and ACTION_START in reply.text:
      turn = NativeProtocol(interpreter=self._names.get("interpreter")).parse(reply)
      for call in turn.calls:
        call.id, call.kind = self._id(), "function"
        if call.name is None and call.raw.get("type") == "interpreter":
          call.error = "no code interpreter is available here"
      return turn
    calls = []
    for raw in reply.tool_calls or []:
      name = self._names.get(raw.get("name"), raw.get("name"))
      call = ToolCall(name, None, raw.get("id") or self._id(), "function")
      try:
        args = json.loads(raw.get("arguments") or "{}")
        if not isinstance(args, dict):
          raise ValueError
        call.arguments = args
      except ValueError:
        call.error, call.arguments = "arguments are not a JSON object", raw.get("arguments")
      calls.append(call)
    return Turn(reply.text.strip(), calls)

  def assistant_message(self, turn: Turn) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": turn.content or None}
    if turn.calls:
      message["tool_calls"] = [
          {"id": c.id, "type": "function",
           "function": {"name": _api_name(c.name or "invalid"),
                        "arguments": c.arguments if isinstance(c.arguments, str) else json.dumps(c.arguments or {})}}
          for c in turn.calls]
    return message

  def result_message(self, call: ToolCall, result: ActionResult) -> dict:
    return {"role": "tool", "tool_call_id": call.id, "content": result.text()}

  def execute(self, call: ToolCall, executor: ActionExecutor) -> ActionResult | None:
    if call.error:
      return malformed_result(call, "Call the function again with a JSON object of arguments.")
    return None


def get_protocol(name: str, **kwargs) -> NativeProtocol | OpenAIProtocol:
  protocols: Mapping[str, type] = {"internlm2": NativeProtocol, "native": NativeProtocol, "openai": OpenAIProtocol}
  if name not in protocols:
    raise ValueError(f"unknown protocol {name!r}; choose from {sorted(protocols)}")
  return protocols[name](**kwargs)
