"""What every agent shares: the step record, the run result, per-session memory, budgets and the step callback.

An agent's `run(task, session_id)` always returns an AgentResult: the LLM failing, a tool failing, a malformed
call or a spent budget end the run with a status, never with an exception.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterable

from internlm_jax.agent.actions import ActionExecutor, ActionResult, Tool, Toolkit
from internlm_jax.agent.llm import LLM, LLMError, Reply

log = logging.getLogger(__name__)

# AgentResult.status values
FINISHED, MAX_STEPS, TIMEOUT, LLM_ERROR, STOPPED = "finished", "max_steps", "timeout", "llm_error", "stopped"


@dataclasses.dataclass
class Step:
  """One event of a run, streamed to `on_step` as it happens.
  kind: "thought" (model text), "action" (a tool call about to run), "observation" (its result), "plan"
  (ReWOO), "answer" (the final answer), "error" (format problems, budget, LLM failures)."""
  kind: str
  content: str = ""
  tool: str | None = None
  args: Any = None
  status: str | None = None  # for observations: success / args_error / tool_error
  images: list[str] = dataclasses.field(default_factory=list)
  elapsed_s: float = 0.0  # since the run started

  def to_dict(self) -> dict[str, Any]:
    out = {"kind": self.kind, "content": self.content, "elapsed_s": round(self.elapsed_s, 3)}
    for key in ("tool", "args", "status"):
      if getattr(self, key) is not None:
        out[key] = getattr(self, key)
    if self.images:
      out["images"] = self.images
    return out


@dataclasses.dataclass
class AgentResult:
  final_answer: str | None
  steps: list[Step]
  status: str = FINISHED
  error: str | None = None
  duration_s: float = 0.0
  llm_calls: int = 0

  @property
  def tool_results(self) -> list[Step]:
    return [s for s in self.steps if s.kind == "observation"]

  def to_dict(self) -> dict[str, Any]:
    return {"final_answer": self.final_answer, "status": self.status, "error": self.error,
            "duration_s": round(self.duration_s, 3), "llm_calls": self.llm_calls,
            "steps": [s.to_dict() for s in self.steps]}


class StopAgent(Exception):
  """Raise from an `on_step` callback to stop the run (a user pressed stop); the result has status "stopped"."""


class Memory:
  """Conversation history per session id, as chat messages; each agent decides what it keeps."""

  def __init__(self):
    self.sessions: dict[str, list[dict[str, Any]]] = {}

  def get(self, session_id: str) -> list[dict[str, Any]]:
    return self.sessions.setdefault(session_id, [])

  def add(self, session_id: str, *messages: dict[str, Any]) -> None:
    self.get(session_id).extend(messages)

  def reset(self, session_id: str | None = None) -> None:
    if session_id is None:
      self.sessions.clear()
    else:
      self.sessions.pop(session_id, None)


class BudgetExceeded(Exception):
  def __init__(self, status: str, message: str):
    super().__init__(message)
    self.status = status


class RunContext:
  """One run's steps, clock and budget."""

  def __init__(self, agent: "BaseAgent"):
    self.agent = agent
    self.start = time.monotonic()
    self.steps: list[Step] = []
    self.llm_calls = 0

  @property
  def elapsed_s(self) -> float:
    return time.monotonic() - self.start

  def check(self, llm_call: bool = False) -> None:
    if self.agent.max_seconds is not None and self.elapsed_s >= self.agent.max_seconds:
      raise BudgetExceeded(TIMEOUT, f"time budget of {self.agent.max_seconds:g}s spent")
    if llm_call and self.llm_calls >= self.agent.max_steps:
      raise BudgetExceeded(MAX_STEPS, f"step budget of {self.agent.max_steps} model calls spent")

  def emit(self, step: Step) -> Step:
    step.elapsed_s = self.elapsed_s
    self.steps.append(step)
    if self.agent.on_step is not None:
      try:
        self.agent.on_step(step)
      except StopAgent:
        raise
      except Exception as e:  # a broken status display must not end the agent's work
        log.warning("on_step callback failed: %s", e)
    return step


class BaseAgent:
  """Holds the LLM, the tools (an ActionExecutor), memory, budgets and the step callback.

  Subclasses implement `_run(task, history, ctx) -> final answer` and may append to memory.
  max_steps: model calls per run. max_seconds: wall-clock budget per run (checked before every model and tool
  call; a call already running is bounded by its own timeout).
  """

  def __init__(self, llm: LLM, tools: ActionExecutor | Iterable[Tool | Toolkit | Callable] = (), *,
               max_steps: int = 10, max_seconds: float | None = 300.0, on_step: Callable[[Step], Any] | None = None,
               max_tokens: int = 512, temperature: float = 0.0, system: str | None = None):
    self.llm = llm
    self.executor = tools if isinstance(tools, ActionExecutor) else ActionExecutor(tools)
    self.max_steps, self.max_seconds, self.on_step = max_steps, max_seconds, on_step
    self.max_tokens, self.temperature, self.system = max_tokens, temperature, system
    self.memory = Memory()

  def run(self, task: str, session_id: str = "default") -> AgentResult:
    ctx = RunContext(self)
    status, error, answer = FINISHED, None, None
    try:
      answer = self._run(task, self.memory.get(session_id), ctx)
    except BudgetExceeded as e:
      status, error = e.status, str(e)
    except LLMError as e:
      status, error = LLM_ERROR, str(e)
    except StopAgent as e:
      status, error = STOPPED, str(e) or "stopped by the step callback"
    if error is not None:
      try:
        ctx.emit(Step("error", error))
      except StopAgent:
        pass
    return AgentResult(answer, ctx.steps, status, error, ctx.elapsed_s, ctx.llm_calls)

  def reset(self, session_id: str | None = None) -> None:
    self.memory.reset(session_id)

  def close(self) -> None:
    self.executor.close()

  def _run(self, task: str, history: list[dict[str, Any]], ctx: RunContext) -> str | None:
    raise NotImplementedError

  # ---- helpers for subclasses --------------------------------------------------------------------------------
  def _chat(self, ctx: RunContext, messages, *, tools=None, stop=None) -> Reply:
    ctx.check(llm_call=True)
    ctx.llm_calls += 1
    return self.llm.chat(messages, tools=tools, stop=stop, max_tokens=self.max_tokens,
                         temperature=self.temperature)

  def _act(self, ctx: RunContext, name: str | None, args: Any, result: ActionResult | None = None) -> ActionResult:
    """Runs one tool call (or reports a precomputed result, e.g. a malformed call) with action and observation
    steps around it."""
    ctx.check()
    ctx.emit(Step("action", tool=name, args=args))
    if result is None:
      result = self.executor(name, args)
    ctx.emit(Step("observation", result.text(), tool=name, status=result.status, images=result.images))
    return result
