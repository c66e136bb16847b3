"""Protocols: the native InternLM2 format (via the tokenizer's template and parser) and OpenAI tool calls."""
import json

from internlm_jax.agent import ActionExecutor, ActionResult, Reply, Toolkit, calculator, tool_api
from internlm_jax.agent.protocols import NativeProtocol, OpenAIProtocol, ToolCall
from internlm_jax.tokenizer import render_chat


class Files(Toolkit):
  name = "files"

  @tool_api
  def read(self, path: str) -> str:
    """Reads a file.

    Args:
      path: File path.
    """
    return "content of " + path


def python(code: str) -> str:
  """Runs code.

  Args:
    code: Python source.
  """
  return "ran"


EXECUTOR = ActionExecutor([calculator, Files(), python])


def test_native_request_renders_interpreter_and_plugin_turns():
  proto = NativeProtocol(interpreter="python")
  messages, tools = proto.request(None, [{"role": "user", "content": "hi"}], EXECUTOR)
  assert [t["name"] for t in tools] == ["calculator", "files.read"]  # the interpreter is not a plugin
  prompt = render_chat(messages, tools=tools)
  assert "<|im_start|>system name=<|interpreter|>\n" in prompt
  assert "<|im_start|>system name=<|plugin|>\n[{\"name\": \"calculator\"" in prompt
  assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
  assert proto.stop == ("<|action_end|>",)
  no_interp, _ = NativeProtocol(interpreter=None).request("Be brief.", [], EXECUTOR)
  assert no_interp == [{"role": "system", "content": "Be brief."}]


def test_native_parse_and_history_round_trip():
  proto = NativeProtocol()
  text = ('Let me check.<|action_start|><|plugin|>\n{"name": "files.read", "parameters": {"path": "a.txt"}}'
          '<|action_end|>')
  turn = proto.parse(Reply(text))
  assert turn.content == "Let me check."
  call = turn.calls[0]
  assert (call.name, call.arguments, call.kind, call.error) == ("files.read", {"path": "a.txt"}, "plugin", None)
  assert proto.execute(call, EXECUTOR) is None
  history = [{"role": "user", "content": "read a.txt"}, proto.assistant_message(turn),
             proto.result_message(call, EXECUTOR(call.name, call.arguments))]
  prompt = render_chat(history)
  assert ('<|im_start|>assistant\nLet me check.<|action_start|><|plugin|>\n{"name": "files.read", "parameters": '
          '{"path": "a.txt"}}<|action_end|><|im_end|>\n') in prompt
  assert "<|im_start|>environment name=<|plugin|>\ncontent of a.txt<|im_end|>\n" in prompt

  code = proto.parse(Reply("<|action_start|><|interpreter|>\n```python\nprint(1)\n```"))  # cut at the stop word
  assert (code.calls[0].name, code.calls[0].arguments, code.calls[0].kind) == ("python", {"code": "print(1)"},
                                                                                "interpreter")
  env = proto.result_message(code.calls[0], ActionResult("python", {}, parts=[{"type": "text", "content": "1"}]))
  assert env == {"role": "environment", "name": "interpreter", "content": "1"}


def test_native_malformed_calls_become_argument_errors():
  proto = NativeProtocol()
  turn = proto.parse(Reply('<|action_start|><|plugin|>\n{"name": "calculator", "parameters": {"expression": 1+}'
                           '<|action_end|>'))
  result = proto.execute(turn.calls[0], EXECUTOR)
  assert result.status == "args_error" and "malformed tool call (invalid JSON" in result.error
  # The broken call is replayed verbatim so the model sees what it wrote.
  assert '{"expression": 1+}' in render_chat([proto.assistant_message(turn)], add_generation_prompt=False)
  no_interp = NativeProtocol(interpreter=None)
  call = no_interp.parse(Reply("<|action_start|><|interpreter|>\nx=1<|action_end|>")).calls[0]
  assert "no code interpreter" in no_interp.execute(call, EXECUTOR).error


def test_openai_request_and_parse():
  proto = OpenAIProtocol()
  messages, tools = proto.request("sys", [{"role": "user", "content": "q"}], EXECUTOR)
  assert messages[0] == {"role": "system", "content": "sys"}
  names = [t["function"]["name"] for t in tools]
  assert names == ["calculator", "files__read", "python"] and all(t["type"] == "function" for t in tools)
  reply = Reply("", [{"id": "c1", "name": "files__read", "arguments": '{"path": "b"}'},
                     {"id": None, "name": "calculator", "arguments": "{oops"}])
  turn = proto.parse(reply)
  assert (turn.calls[0].name, turn.calls[0].arguments, turn.calls[0].id) == ("files.read", {"path": "b"}, "c1")
  assert turn.calls[1].error and turn.calls[1].id.startswith("call_")
  assert proto.execute(turn.calls[1], EXECUTOR).status == "args_error"
  message = proto.assistant_message(turn)
  assert message["content"] is None
  assert message["tool_calls"][0] == {"id": "c1", "type": "function",
                                      "function": {"name": "files__read", "arguments": json.dumps({"path": "b"})}}
  assert proto.result_message(turn.calls[0], ActionResult("x", {}, parts=[{"type": "text", "content": "r"}])) == \
      {"role": "tool", "tool_call_id": "c1", "content": "r"}


def test_openai_reads_native_spans_when_the_server_has_no_tool_parser():
  proto = OpenAIProtocol()
  proto.request(None, [], EXECUTOR)
  turn = proto.parse(Reply('ok<|action_start|><|plugin|>\n{"name": "calculator", "parameters": '
                           '{"expression": "1+1"}}<|action_end|>'))
  call = turn.calls[0]
  assert isinstance(call, ToolCall) and (call.name, call.arguments, call.kind) == ("calculator",
                                                                                   {"expression": "1+1"}, "function")
  assert turn.content == "ok"


def test_openai_interpreter_function_goes_to_the_interpreter_tool():
  proto = OpenAIProtocol(interpreter="python")
  proto.request(None, [], EXECUTOR)
  call = proto.parse(Reply("", [{"id": "i", "name": "interpreter", "arguments": '{"code": "1+1"}'}])).calls[0]
  assert (call.name, call.arguments) == ("python", {"code": "1+1"})
  native = proto.parse(Reply("<|action_start|><|interpreter|>\n1+1<|action_end|>")).calls[0]
  assert (native.name, native.arguments, native.error) == ("python", {"code": "1+1"}, None)
  bare = OpenAIProtocol(interpreter=None)
  bare.request(None, [], ActionExecutor([calculator]))
  assert bare.parse(Reply("<|action_start|><|interpreter|>\nx<|action_end|>")).calls[0].error
