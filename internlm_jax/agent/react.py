"""ReAct (Yao et al. 2022) in plain text: Thought / Action / Action Input, the system adds the Observation.

The model is stopped at "Observation:" so it cannot invent tool results; each tool result goes back as a user
turn starting with "Observation:". A reply with neither an action nor a final answer is answered with a format
hint (an args_error observation) and costs one step, like any other.
"""
from __future__ import annotations

import re
from typing import Any

from internlm_jax.agent.actions import ARGS_ERROR, ActionResult
from internlm_jax.agent.base import BaseAgent, RunContext, Step

REACT_SYSTEM = """Answer the user's question as well as you can. You can use these tools:

{tools}

Use exactly this format:
Thought: what to do next and why
Action: the tool to use, one of [{names}]
Action Input: the tool's arguments as a JSON object
Observation: the tool's result (the system writes this line, never you)
... (Thought / Action / Action Input / Observation may repeat)
Thought: I now know the final answer
Final Answer: the answer to the question

Call one tool at a time. Give the Final Answer as soon as you know it."""

STOP = ("Observation:",)
FORMAT_HINT = ("Your reply had neither an action nor a final answer. Reply with 'Thought: ...' then either "
               "'Action: <tool>' and 'Action Input: <JSON object>', or 'Final Answer: <answer>'.")

_FINAL_RE = re.compile(r"Final\s+Answer\s*:\s*(.*)", re.DOTALL | re.IGNORECASE)
_ACTION_RE = re.compile(r"Action\s*:\s*(.*?)\s*\n+\s*Action\s+Input\s*:\s*(.*)", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_react(text: str) -> dict[str, Any]:
  """{"thought", and either "final" or ("action", "input")}; {"thought"} alone when the format is broken."""
  action = _ACTION_RE.search(text)
  final = _FINAL_RE.search(text)
  # An action written before a final answer wins: the answer then rests on an observation not yet seen.
  if final and (action is None or final.start() < action.start()):
    thought = text[:final.start()]
    return {"thought": _strip_label(thought), "final": final.group(1).strip()}
  if action:
    name = action.group(1).strip().strip("[]`'\" ")
    raw = action.group(2).strip()
    fenced = _FENCE_RE.match(raw)
    return {"thought": _strip_label(text[:action.start()]), "action": name,
            "input": fenced.group(1) if fenced else raw}
  return {"thought": _strip_label(text)}


def _strip_label(text: str) -> str:
  return re.sub(r"^\s*Thought\s*:\s*", "", text.strip(), flags=re.IGNORECASE).strip()


class ReActAgent(BaseAgent):
  """ReAct over any LLM backend. Memory keeps each session's (question, final answer) pairs."""

  def _run(self, task: str, history: list[dict], ctx: RunContext) -> str | None:
    names = ", ".join(self.executor.tools)
    system = REACT_SYSTEM.format(tools=self.executor.describe() or "(no tools)", names=names)
    if self.system:
      system = self.system + "\n\n" + system
    messages = [{"role": "system", "content": system}, *history, {"role": "user", "content": task}]
    while True:
      reply = self._chat(ctx, messages, stop=STOP)
      text = reply.text.strip()
      parsed = parse_react(text)
      if parsed["thought"]:
        ctx.emit(Step("thought", parsed["thought"]))
      messages.append({"role": "assistant", "content": text})
      if "final" in parsed:
        ctx.emit(Step("answer", parsed["final"]))
        history += [{"role": "user", "content": task}, {"role": "assistant", "content": parsed["final"]}]
        return parsed["final"]
      if "action" in parsed:
        result = self._act(ctx, parsed["action"], parsed["input"])
      else:
        result = self._act(ctx, None, text, ActionResult(None, text, ARGS_ERROR, error=FORMAT_HINT))
      messages.append({"role": "user", "content": f"Observation: {result.text()}"})
