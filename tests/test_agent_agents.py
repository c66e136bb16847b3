"""ReAct, ReWOO and the InternLM2 agent with scripted models: tool use, malformed calls, memory, the step callback,
and step / time budgets. Every run must end with a result, never an exception."""
import json
import time

from internlm_jax.agent import (ActionExecutor, InternLM2Agent, ReActAgent, Reply, ReWOOAgent, ScriptedLLM,
                                StopAgent, calculator, make_tool)
from internlm_jax.agent.rewoo import parse_plan, substitute
from internlm_jax.tokenizer import render_chat


@make_tool
def lookup(name: str) -> str:
  """Looks up a person's age.

  Args:
    name: The person.
  """
  return {"Ada": "36", "Alan": 'forty-one "41"'}[name]


@make_tool
def slow(seconds: float) -> str:
  """Sleeps.

  Args:
    seconds: How long.
  """
  time.sleep(seconds)
  return "slept"


def kinds(result):
  return [s.kind for s in result.steps]


# ---- ReAct ------------------------------------------------------------------------------------------------------
def test_react_uses_tools_and_cuts_invented_observations():
  llm = ScriptedLLM([
      'Thought: get the age\nAction: lookup\nAction Input: {"name": "Ada"}\nObservation: 99 (invented)',
      "Thought: double it\nAction: [calculator]\nAction Input: ```json\n{\"expression\": \"36 * 2\"}\n```",
      "Thought: I now know the final answer\nFinal Answer: 72"])
  seen = []
  agent = ReActAgent(llm, [lookup, calculator], on_step=seen.append)
  result = agent.run("What is twice Ada's age?")
  assert result.final_answer == "72" and result.status == "finished" and result.llm_calls == 3
  assert kinds(result) == ["thought", "action", "observation", "thought", "action", "observation", "thought",
                           "answer"]
  assert seen == result.steps  # streamed as they happened
  assert llm.calls[0]["stop"] == ["Observation:"]
  assert "lookup: Looks up a person's age." in llm.calls[0]["messages"][0]["content"]
  assert llm.calls[1]["messages"][-2]["content"].endswith('Action Input: {"name": "Ada"}')  # invented part cut
  assert llm.calls[1]["messages"][-1] == {"role": "user", "content": "Observation: 36"}
  assert json.dumps(result.to_dict())


def test_react_malformed_replies_and_bad_calls_are_observations():
  llm = ScriptedLLM(["I am not sure what to do.", "Thought: x\nAction: nosuchtool\nAction Input: {}",
                     'Thought: y\nAction: lookup\nAction Input: {"who": "Ada"}',
                     'Action: lookup\nAction Input: {"name": "Bob"}', "Final Answer: unknown"])
  result = ReActAgent(llm, [lookup]).run("How old is Bob?")
  statuses = [s.status for s in result.steps if s.kind == "observation"]
  assert statuses == ["args_error", "args_error", "args_error", "tool_error"]
  assert "neither an action nor a final answer" in llm.calls[1]["messages"][-1]["content"]
  assert "unknown tool 'nosuchtool'" in llm.calls[2]["messages"][-1]["content"]
  assert "KeyError" in llm.calls[4]["messages"][-1]["content"]
  assert result.final_answer == "unknown" and result.status == "finished"


def test_react_memory_and_sessions():
  llm = ScriptedLLM(["Final Answer: Paris", "Final Answer: about 2 million", "Final Answer: fresh"])
  agent = ReActAgent(llm, [lookup])
  agent.run("Capital of France?")
  agent.run("Its population?")
  assert llm.calls[1]["messages"][1:3] == [{"role": "user", "content": "Capital of France?"},
                                            {"role": "assistant", "content": "Paris"}]
  agent.run("New topic", session_id="other")
  assert len(llm.calls[2]["messages"]) == 2  # system + the new question only


def test_budgets_llm_errors_and_callbacks():
  loop = ScriptedLLM(lambda messages, tools: 'Action: lookup\nAction Input: {"name": "Ada"}')
  result = ReActAgent(loop, [lookup], max_steps=3).run("loop forever")
  assert result.status == "max_steps" and result.final_answer is None and result.llm_calls == 3
  assert result.steps[-1].kind == "error" and "step budget of 3" in result.steps[-1].content

  sleepy = ScriptedLLM(lambda messages, tools: 'Action: slow\nAction Input: {"seconds": 0.3}')
  start = time.monotonic()
  result = ReActAgent(sleepy, [slow], max_seconds=0.5, max_steps=100).run("sleep")
  assert result.status == "timeout" and time.monotonic() - start < 2.0

  result = ReActAgent(ScriptedLLM([]), [lookup]).run("no replies")
  assert result.status == "llm_error" and "only 0 replies" in result.error

  def stop_on_action(step):
    if step.kind == "action":
      raise StopAgent("user pressed stop")
  result = ReActAgent(loop, [lookup], on_step=stop_on_action).run("x")
  assert result.status == "stopped" and result.error == "user pressed stop"

  def broken(step):
    raise RuntimeError("display crashed")
  result = ReActAgent(ScriptedLLM(["Final Answer: 1"]), [], on_step=broken).run("x")
  assert result.status == "finished" and result.final_answer == "1"


# ---- ReWOO ------------------------------------------------------------------------------------------------------
PLAN = """Plan: find Alan's age
#E1 = lookup[{"name": "Alan"}]
Plan: find Ada's age
#E2 = lookup[{"name": "Ada"}]
Plan: add them
#E3 = calculator[{"expression": "#E2 + 41"}]"""


def test_rewoo_plan_workers_solver():
  llm = ScriptedLLM([PLAN, "Thinking...\nFinal Answer: 77"])
  result = ReWOOAgent(llm, [lookup, calculator]).run("Sum of the ages?")
  assert result.final_answer == "77" and result.llm_calls == 2
  assert kinds(result) == ["plan"] + ["action", "observation"] * 3 + ["answer"]
  assert [s.args for s in result.steps if s.kind == "action"][2] == {"expression": "36 + 41"}
  solver = llm.calls[1]["messages"][-1]["content"]
  assert "Task: Sum of the ages?" in solver and "#E3 = calculator" in solver and "Evidence: 77" in solver
  assert "Evidence: forty-one \"41\"" in solver


def test_rewoo_parse_and_substitute():
  steps = parse_plan(PLAN + "\n#E4 = bad line without brackets\nrandom text")
  assert [(s["var"], s["tool"]) for s in steps] == [("#E1", "lookup"), ("#E2", "lookup"), ("#E3", "calculator")]
  assert steps[0]["plan"] == "find Alan's age"
  # Evidence with quotes stays valid JSON; #E12 is not clobbered by #E1.
  assert substitute('{"q": "#E1 and #E12"}', {"#E1": 'say "hi"', "#E12": "x"}) == {"q": 'say "hi" and x'}
  assert substitute("plain #E1", {"#E1": "v"}) == "plain v"


def test_rewoo_replans_once_then_answers_without_evidence():
  llm = ScriptedLLM(["I will just think.", 'Plan: p\n#E1 = nosuch[{"a": 1}]', "Final Answer: 5"])
  result = ReWOOAgent(llm, [lookup]).run("q")
  assert "Write the plan again" in llm.calls[1]["messages"][-1]["content"]
  assert [s.status for s in result.steps if s.kind == "observation"] == ["args_error"]
  assert result.final_answer == "5"
  llm = ScriptedLLM(["no plan", "still no plan", "Final Answer: guess"])
  result = ReWOOAgent(llm, [lookup]).run("q")
  assert "(no evidence" in llm.calls[2]["messages"][-1]["content"] and result.final_answer == "guess"


# ---- InternLM2 --------------------------------------------------------------------------------------------------
def interpreter(code: str) -> str:
  """Runs code.

  Args:
    code: Source.
  """
  return f"ran {len(code)} chars"


def test_internlm2_native_multi_turn():
  llm = ScriptedLLM([
      'Looking up.<|action_start|><|plugin|>\n{"name": "lookup", "parameters": {"name": "Ada"}}<|action_end|>',
      "<|action_start|><|interpreter|>\n```python\nprint(36 * 2)\n```<|action_end|>",
      "Ada is 36; twice that is 72.<|im_end|>",
      "You asked about Ada.<|im_end|>"])
  agent = InternLM2Agent(llm, [lookup, make_tool(interpreter, name="python")])
  result = agent.run("Twice Ada's age?")
  assert result.final_answer == "Ada is 36; twice that is 72." and result.status == "finished"
  assert kinds(result) == ["thought", "action", "observation", "action", "observation", "answer"]
  assert llm.calls[0]["stop"] == ["<|action_end|>"]
  assert [t["name"] for t in llm.calls[0]["tools"]] == ["lookup"]
  third = llm.calls[2]["messages"]
  assert third[-1] == {"role": "environment", "name": "interpreter", "content": "ran 13 chars"}
  assert third[-3] == {"role": "environment", "name": "plugin", "content": "36"}
  agent.run("Who did I ask about?")
  history = llm.calls[3]["messages"]
  prompt = render_chat(history, tools=llm.calls[3]["tools"])  # the kept conversation renders cleanly
  assert prompt.count("<|im_start|>environment") == 2 and prompt.count("<|im_start|>user") == 2


def test_internlm2_malformed_call_then_recovery_and_max_turns():
  llm = ScriptedLLM(['<|action_start|><|plugin|>\n{"name": "lookup", "parameters": {name: Ada}}<|action_end|>',
                     '<|action_start|><|plugin|>\n{"name": "lookup", "parameters": {"name": "Ada"}}<|action_end|>',
                     "36"])
  result = InternLM2Agent(llm, [lookup]).run("Ada's age?")
  assert [s.status for s in result.steps if s.kind == "observation"] == ["args_error", "success"]
  assert "malformed tool call" in llm.calls[1]["messages"][-1]["content"]
  assert result.final_answer == "36"

  forever = ScriptedLLM(lambda m, t: '<|action_start|><|plugin|>\n{"name": "lookup", "parameters": '
                                     '{"name": "Ada"}}<|action_end|>')
  agent = InternLM2Agent(forever, [lookup], max_turns=3)
  result = agent.run("loop")
  assert result.status == "max_steps" and result.llm_calls == 3 and result.final_answer is None


def test_internlm2_over_openai_tool_calls():
  llm = ScriptedLLM([Reply("", [{"id": "a", "name": "lookup", "arguments": '{"name": "Ada"}'}]),
                     Reply("She is 36.")])
  result = InternLM2Agent(llm, ActionExecutor([lookup]), protocol="openai").run("Ada?")
  assert result.final_answer == "She is 36."
  messages = llm.calls[1]["messages"]
  assert messages[-2]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"name": "Ada"}'}
  assert messages[-1] == {"role": "tool", "tool_call_id": "a", "content": "36"}
  assert llm.calls[0]["tools"][0]["type"] == "function"


def test_internlm2_time_budget_keeps_history_valid():
  llm = ScriptedLLM(lambda m, t: Reply("", [{"id": "s1", "name": "slow", "arguments": '{"seconds": 0.3}'},
                                            {"id": "s2", "name": "slow", "arguments": '{"seconds": 0.3}'}]))
  agent = InternLM2Agent(llm, [slow], protocol="openai", max_seconds=0.2)
  result = agent.run("sleep twice")
  assert result.status == "timeout"
  history = agent.memory.get("default")
  assert [m.get("tool_call_id") for m in history if m["role"] == "tool"] == ["s1", "s2"]
  assert "not run" in history[-1]["content"]
