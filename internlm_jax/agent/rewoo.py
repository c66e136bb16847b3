"""ReWOO (Xu et al. 2023): a planner writes the whole plan with evidence variables, workers run the tools, a
solver answers from the evidence. Two model calls for any number of tool calls; no observation goes back into
the planner unless the plan cannot be read, when it is asked again with a hint.

Plan format (one tool call per evidence line; later inputs may mention earlier evidence as #E1, #E2, ...):
  Plan: find the population
  #E1 = search[{"query": "population of X"}]
  Plan: double it
  #E2 = calculator[{"expression": "2 * #E1"}]
"""
from __future__ import annotations

import json
import re
from typing import Any

from internlm_jax.agent.base import BaseAgent, RunContext, Step

PLANNER_SYSTEM = """Make a plan to solve the task with the tools below, one step per tool call. For each step write
a "Plan:" line and then an evidence line "#E<n> = <tool>[<arguments as a JSON object>]". A later step may use
an earlier result by writing #E<n> inside its arguments. Do not solve the task yourself; only write the plan.

Tools:
{tools}

Example:
Plan: compute the area of a 3 by 4 rectangle
#E1 = calculator[{{"expression": "3 * 4"}}]"""

SOLVER_PROMPT = """Solve the task using the plan and the evidence gathered for it. The evidence may be incomplete
or contain errors; use it with care.

Task: {task}

{work}

Reply with "Final Answer: " followed by the answer only."""

PLAN_HINT = ("The plan had no step in the form '#E1 = tool[{{\"arg\": ...}}]'. Write the plan again in that format, "
             "using only these tools: {names}.")
_STEP_RE = re.compile(r"^\s*#E(\d+)\s*=\s*([\w.\-]+)\s*\[(.*)\]\s*$")
_PLAN_RE = re.compile(r"^\s*Plan\s*:\s*(.*)$", re.IGNORECASE)
_FINAL_RE = re.compile(r"Final\s+Answer\s*:\s*(.*)", re.DOTALL | re.IGNORECASE)


def parse_plan(text: str) -> list[dict[str, Any]]:
  """[{"plan", "var", "tool", "input"}] from the planner's text; lines in other forms are ignored."""
  steps, plan = [], ""
  for line in text.splitlines():
    plan_match = _PLAN_RE.match(line)
    if plan_match:
      plan = plan_match.group(1).strip()
      continue
    step = _STEP_RE.match(line)
    if step:
      steps.append({"plan": plan, "var": f"#E{step.group(1)}", "tool": step.group(2), "input": step.group(3).strip()})
      plan = ""
  return steps


def substitute(raw: str, evidence: dict[str, str]) -> Any:
  """The step's arguments with #En replaced by evidence text: inside JSON string values when the input is
  JSON (so quotes in the evidence cannot break it), else in the raw text. Longest names first (#E12 before #E1)."""
  names = sorted(evidence, key=len, reverse=True)

  def fill(text: str) -> str:
    for name in names:
      text = text.replace(name, evidence[name])
    return text

  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    return fill(raw)

  def walk(v: Any) -> Any:
    if isinstance(v, str):
      return fill(v)
    if isinstance(v, list):
      return [walk(x) for x in v]
    if isinstance(v, dict):
      return {k: walk(x) for k, x in v.items()}
    return v

  return walk(value)


class ReWOOAgent(BaseAgent):
  """Planner -> workers -> solver. `max_plan_attempts` planner calls at most; plans longer than `max_tool_calls`
  are cut. Memory keeps (task, final answer) pairs."""

  def __init__(self, *args, max_plan_attempts: int = 2, max_tool_calls: int = 8, **kwargs):
    super().__init__(*args, **kwargs)
    self.max_plan_attempts, self.max_tool_calls = max_plan_attempts, max_tool_calls

  def _run(self, task: str, history: list[dict], ctx: RunContext) -> str | None:
    system = PLANNER_SYSTEM.format(tools=self.executor.describe() or "(no tools)")
    if self.system:
      system = self.system + "\n\n" + system
    messages = [{"role": "system", "content": system}, *history, {"role": "user", "content": task}]
    steps: list[dict[str, Any]] = []
    for attempt in range(self.max_plan_attempts):
      text = self._chat(ctx, messages).text.strip()
      steps = parse_plan(text)
      ctx.emit(Step("plan", text))
      if steps:
        break
      if attempt + 1 == self.max_plan_attempts:
        ctx.emit(Step("error", "no readable plan; the solver answers without evidence"))
        break
      hint = PLAN_HINT.format(names=", ".join(self.executor.tools))
      ctx.emit(Step("error", hint))
      messages += [{"role": "assistant", "content": text}, {"role": "user", "content": hint}]
    if len(steps) > self.max_tool_calls:
      ctx.emit(Step("error", f"the plan has {len(steps)} steps; running the first {self.max_tool_calls}"))
      steps = steps[:self.max_tool_calls]
    evidence: dict[str, str] = {}
    work = []
    for step in steps:
      result = self._act(ctx, step["tool"], substitute(step["input"], evidence))
      evidence[step["var"]] = result.text()
      work.append(f"Plan: {step['plan']}\n{step['var']} = {step['tool']}[{step['input']}]\n"
                  f"Evidence: {evidence[step['var']]}")
    prompt = SOLVER_PROMPT.format(task=task, work="\n\n".join(work) or "(no evidence: answer from knowledge)")
    text = self._chat(ctx, [*history, {"role": "user", "content": prompt}]).text.strip()
    final = _FINAL_RE.search(text)
    answer = final.group(1).strip() if final else text
    ctx.emit(Step("answer", answer))
    history += [{"role": "user", "content": task}, {"role": "assistant", "content": answer}]
    return answer
