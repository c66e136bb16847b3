"""A small tool-use benchmark with known answers, and its runner.

Three kinds of task: arithmetic (calculator), data questions over a CSV file (the Python interpreter), and facts
about invented places that only the local documents hold (BM25 search). Every task offers all three tools, so the
score also shows whether the model picks the right one. Scores per task: the final answer is correct (numbers
compared as numbers, text by containment), the expected tool was used, and the share of tool calls that were
valid (status success).

`oracle_llm(kind)` is a scripted model that calls the reference tool and answers with what the tool returned (not
with the known answer), so a perfect score checks the tools, the protocols and the scoring end to end.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from typing import Any, Callable, Sequence

from internlm_jax.agent.base import AgentResult, BaseAgent
from internlm_jax.agent.interpreter import InterpreterTool
from internlm_jax.agent.llm import Reply, ScriptedLLM
from internlm_jax.agent.tools import SearchTool, calculator

SALES_CSV = """region,month,units,price
North,Jan,120,2.50
South,Jan,80,3.00
North,Feb,150,2.50
South,Feb,95,3.10
North,Mar,130,2.75
South,Mar,160,3.00
East,Jan,60,4.00
East,Feb,75,4.00
East,Mar,90,3.80
"""

DOCUMENTS = [
    {"id": "varnholt", "title": "Varnholt Observatory",
     "text": "The Varnholt Observatory, on the ridge above Lake Seren, was completed in 1871 by the astronomer "
             "Ilse Varnholt. Its main telescope has a 64 cm lens."},
    {"id": "seren", "title": "Lake Seren",
     "text": "Lake Seren is a glacial lake 14 km long. The town of Merrowdale lies on its southern shore."},
    {"id": "merrowdale", "title": "Merrowdale",
     "text": "Merrowdale is known for its annual lantern festival, first held in 1902, and for the Quillon bridge."},
    {"id": "quillon", "title": "Quillon bridge",
     "text": "The Quillon bridge in Merrowdale is a stone bridge that has 7 arches; it opened in 1838."},
    {"id": "ilse", "title": "Ilse Varnholt",
     "text": "Ilse Varnholt (1829-1904) was an astronomer who catalogued 412 double stars from her observatory."},
    {"id": "serenity", "title": "Serenity Observatory",
     "text": "The Serenity Observatory on Mount Alder opened in 1923 and houses a radio telescope."},
]

_CSV_CODE = "import csv\nrows = list(csv.DictReader(open('sales.csv')))\n"


@dataclasses.dataclass(frozen=True)
class BenchTask:
  id: str
  category: str  # "arithmetic" | "data" | "retrieval"
  question: str
  answer: str
  tool: str  # the tool a good agent uses
  reference_args: dict  # the oracle's call
  extract: str | None = None  # regex whose group 1 is the answer in the tool's output (oracle only)
  files: tuple[tuple[str, str], ...] = ()  # put into the interpreter's working directory


TASKS: tuple[BenchTask, ...] = (
    BenchTask("calc_product", "arithmetic", "What is 1234 * 5678 + 91?", "7006743", "calculator",
              {"expression": "1234 * 5678 + 91"}),
    BenchTask("calc_fraction", "arithmetic", "What is (17.5 * 4 - 3) / 2.5?", "26.8", "calculator",
              {"expression": "(17.5 * 4 - 3) / 2.5"}),
    BenchTask("calc_power", "arithmetic", "What is 2 to the power of 40, minus 1?", "1099511627775", "calculator",
              {"expression": "2 ** 40 - 1"}),
    BenchTask("data_revenue", "data", "sales.csv has columns region, month, units, price. What is the total "
              "revenue (units times price) of the North region?", "1032.5", "python",
              {"code": _CSV_CODE + "sum(int(r['units']) * float(r['price']) for r in rows if r['region'] == "
                                   "'North')"}, files=(("sales.csv", SALES_CSV),)),
    BenchTask("data_month", "data", "sales.csv has columns region, month, units, price. Which month had the most "
              "units sold over all regions?", "Mar", "python",
              {"code": _CSV_CODE + "totals = {}\nfor r in rows:\n  totals[r['month']] = totals.get(r['month'], 0) + "
                                   "int(r['units'])\nprint(max(totals, key=totals.get))"},
              files=(("sales.csv", SALES_CSV),)),
    BenchTask("data_primes", "data", "How many prime numbers are there below 10000?", "1229", "python",
              {"code": "sum(all(n % d for d in range(2, int(n ** 0.5) + 1)) for n in range(2, 10000))"}),
    BenchTask("doc_year", "retrieval", "In what year was the Varnholt Observatory completed?", "1871", "search",
              {"query": "Varnholt Observatory completed"}, extract=r"completed in (\d{4})"),
    BenchTask("doc_arches", "retrieval", "How many arches does the Quillon bridge have?", "7", "search",
              {"query": "Quillon bridge arches"}, extract=r"has (\d+) arches"),
    BenchTask("doc_stars", "retrieval", "How many double stars did Ilse Varnholt catalogue?", "412", "search",
              {"query": "Ilse Varnholt double stars"}, extract=r"catalogued (\d+) double"),
)

_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def score_answer(answer: str | None, expected: str) -> bool:
  """Numbers: the last number in the answer equals the expected one (to 1e-6, relative); text: the expected
  string occurs in the answer, ignoring case."""
  if not answer:
    return False
  text = re.sub(r"(?<=\d),(?=\d{3})", "", answer)
  try:
    target = float(expected)
  except ValueError:
    return expected.lower() in text.lower()
  numbers = _NUMBER_RE.findall(text)
  return bool(numbers) and abs(float(numbers[-1]) - target) <= 1e-6 * max(1.0, abs(target))


def bench_tools(task: BenchTask, workdir: str) -> list:
  python = InterpreterTool(workdir=f"{workdir}/{task.id}")
  for name, text in task.files:
    python.session.put_file(name, text)
  return [calculator, python, SearchTool(DOCUMENTS)]


def score(task: BenchTask, result: AgentResult) -> dict[str, Any]:
  observations = result.tool_results
  valid = sum(o.status == "success" for o in observations)
  return {"id": task.id, "category": task.category, "expected": task.answer, "answer": result.final_answer,
          "correct": score_answer(result.final_answer, task.answer), "status": result.status,
          "used_tool": any(o.tool == task.tool and o.status == "success" for o in observations),
          "tool_calls": len(observations), "valid_calls": valid, "llm_calls": result.llm_calls,
          "duration_s": round(result.duration_s, 2)}


def run_benchmark(make_agent: Callable[[list], BaseAgent], tasks: Sequence[BenchTask] = TASKS,
                  on_result: Callable[[dict], Any] | None = None) -> dict[str, Any]:
  """Runs every task with a fresh agent from `make_agent(tools)` and returns the report (see `format_report`)."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="agent_bench_") as workdir:
    for task in tasks:
      agent = make_agent(bench_tools(task, workdir))
      try:
        row = score(task, agent.run(task.question))
      finally:
        agent.close()
      rows.append(row)
      if on_result is not None:
        on_result(row)
  calls = sum(r["tool_calls"] for r in rows)
  by_category = {}
  for category in sorted({r["category"] for r in rows}):
    sub = [r for r in rows if r["category"] == category]
    by_category[category] = {"tasks": len(sub), "accuracy": sum(r["correct"] for r in sub) / len(sub)}
  return {"tasks": len(rows), "accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1),
          "tool_use_rate": sum(r["used_tool"] for r in rows) / max(len(rows), 1),
          "valid_call_rate": sum(r["valid_calls"] for r in rows) / calls if calls else 0.0,
          "by_category": by_category, "results": rows}


def format_report(report: dict[str, Any]) -> str:
  lines = [f"{'task':<14} {'category':<11} {'correct':<8} {'tool':<5} {'calls':<6} {'status':<10} answer"]
  for r in report["results"]:
    answer = (r["answer"] or "").replace("\n", " ")[:40]
    lines.append(f"{r['id']:<14} {r['category']:<11} {str(r['correct']):<8} {str(r['used_tool']):<5} "
                 f"{r['valid_calls']}/{r['tool_calls']:<4} {r['status']:<10} {answer}")
  lines.append(f"accuracy {report['accuracy']:.2f}  tool use {report['tool_use_rate']:.2f}  "
               f"valid calls {report['valid_call_rate']:.2f}  ({report['tasks']} tasks)")
  return "\n".join(lines)


# ---- the oracle model -------------------------------------------------------------------------------------------
def _find_task(messages, tasks: Sequence[BenchTask]) -> BenchTask:
  text = "\n".join(str(m.get("content") or "") for m in messages)
  for task in tasks:
    if task.question in text:
      return task
  raise ValueError("the oracle model saw no benchmark question in the conversation")


def _answer_from(task: BenchTask, observation: str) -> str:
  if task.extract:
    match = re.search(task.extract, observation)
    return match.group(1) if match else observation.strip()
  return observation.strip().strip("'\"")


def oracle_llm(kind: str, tasks: Sequence[BenchTask] = TASKS) -> ScriptedLLM:
  """A scripted model for `kind` in ("react", "rewoo", "internlm2") that makes each task's reference call."""

  def script(messages, tools) -> Reply:
    task = _find_task(messages, tasks)
    last = messages[-1]
    args = json.dumps(task.reference_args)
    if kind == "react":
      if last["role"] == "user" and last["content"].startswith("Observation:"):
        answer = _answer_from(task, last["content"][len("Observation:"):])
        return Reply(f"Thought: the tool gave the result.\nFinal Answer: {answer}")
      return Reply(f"Thought: I should use {task.tool}.\nAction: {task.tool}\nAction Input: {args}")
    if kind == "rewoo":
      if "Evidence:" in last["content"]:
        evidence = last["content"].split("Evidence:", 1)[1].split("\n\nReply with")[0]
        return Reply(f"Final Answer: {_answer_from(task, evidence)}")
      return Reply(f"Plan: use {task.tool}\n#E1 = {task.tool}[{args}]")
    if kind == "internlm2":
      if last["role"] == "environment":
        return Reply(f"{_answer_from(task, last['content'])}<|im_end|>")
      if task.tool == "python":
        code = task.reference_args["code"]
        return Reply(f"Let me compute it.<|action_start|><|interpreter|>\n```python\n{code}\n```<|action_end|>")
      call = json.dumps({"name": task.tool, "parameters": task.reference_args})
      return Reply(f"<|action_start|><|plugin|>\n{call}<|action_end|>")
    raise ValueError(f"unknown agent kind {kind!r}")

  return ScriptedLLM(script)
