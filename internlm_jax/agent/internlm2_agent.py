"""The InternLM2 agent (Lagent's Internlm2Agent): the model calls plugins and the interpreter in its own
protocol, results come back as environment turns, and the loop ends at a reply with no call or at max_turns.

Over an OpenAI endpoint the same loop uses OpenAI tool calls (protocol "openai"); `protocol=None` picks that for
an `OpenAIClient` and the native protocol for text backends (in-process model, scripted).
The conversation, tool calls and results included, stays in the session's memory, so a follow-up question sees
what earlier turns computed.
"""
from __future__ import annotations

from internlm_jax.agent.actions import TOOL_ERROR, ActionResult
from internlm_jax.agent.base import BaseAgent, BudgetExceeded, RunContext, Step
from internlm_jax.agent.llm import OpenAIClient
from internlm_jax.agent.protocols import NativeProtocol, OpenAIProtocol, get_protocol


class InternLM2Agent(BaseAgent):

  def __init__(self, llm, tools=(), *, protocol: str | NativeProtocol | OpenAIProtocol | None = None,
               max_turns: int = 5, interpreter: str | None = "python", **kwargs):
    kwargs.setdefault("max_steps", max_turns)
    super().__init__(llm, tools, **kwargs)
    if protocol is None:
      protocol = "openai" if isinstance(llm, OpenAIClient) else "internlm2"
    if isinstance(protocol, str):
      protocol = get_protocol(protocol, interpreter=interpreter)
    self.protocol = protocol

  def _run(self, task: str, history: list[dict], ctx: RunContext) -> str | None:
    history.append({"role": "user", "content": task})
    while True:
      messages, tools = self.protocol.request(self.system, history, self.executor)
      reply = self._chat(ctx, messages, tools=tools, stop=self.protocol.stop)
      turn = self.protocol.parse(reply)
      history.append(self.protocol.assistant_message(turn))
      if not turn.calls:
        ctx.emit(Step("answer", turn.content))
        return turn.content
      if turn.content:
        ctx.emit(Step("thought", turn.content))
      for i, call in enumerate(turn.calls):
        try:
          result = self._act(ctx, call.name, call.arguments, self.protocol.execute(call, self.executor))
        except BudgetExceeded as e:
          # Answer every call before stopping, so the saved conversation stays valid for the next run.
          for rest in turn.calls[i:]:
            history.append(self.protocol.result_message(rest, ActionResult(rest.name, rest.arguments, TOOL_ERROR,
                                                                           error=f"not run: {e}")))
          raise
        history.append(self.protocol.result_message(call, result))
