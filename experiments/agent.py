"""Runs an agent with tools on one task (or the tool-use benchmark) and prints its trace as it happens.

  python experiments/agent.py --agent=react --tools=python,calculator --task="What is 2**20 / 7?" \
      --api_base=http://127.0.0.1:23333/v1 --model=internlm2
  python experiments/agent.py --agent=internlm2 --tools=python --task="..." --checkpoint=DIR
  python experiments/agent.py --agent=internlm2 --tools=python --task="..." --checkpoint=DIR --backend=dense
  python experiments/agent.py --agent=rewoo --tools=calculator --task="..." --scripted=replies.json
  python experiments/agent.py --agent=react --bench --scripted=oracle        # the benchmark, scripted oracle
  python experiments/agent.py --agent=internlm2 --bench --api_base=URL --model=NAME

The model comes from exactly one of: --checkpoint (HF InternLM2 folder or params checkpoint, with
tokenizer.model; run through the serving engine, or on generate.py's dense path with --backend=dense),
--api_base + --model (any OpenAI-compatible endpoint, ours included), --scripted (a JSON list of raw replies, or
"oracle" with --bench). --output=FILE.json writes {"final_answer": ..., "steps": [...], ...}.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from internlm_jax.agent import AGENTS, InProcessLLM, OpenAIClient, ScriptedLLM, Step  # noqa: E402
from internlm_jax.agent.llm import EngineLLM  # noqa: E402
from internlm_jax.agent.tools import builtin_tools  # noqa: E402

AGENT = flags.DEFINE_enum("agent", "react", sorted(AGENTS), "agent type")
TOOLS = flags.DEFINE_list("tools", ["python", "calculator"], "tools: python, calculator, plot, files, search")
TASK = flags.DEFINE_string("task", None, "the task or question")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "model folder to run in-process")
BACKEND = flags.DEFINE_enum("backend", "engine", ["engine", "dense"],
                            "--checkpoint: the serving engine (paged cache, one compile for all prompt lengths) or "
                            "the dense generate.py path")
API_BASE = flags.DEFINE_string("api_base", None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:23333/v1")
MODEL = flags.DEFINE_string("model", None, "model name at --api_base")
API_KEY = flags.DEFINE_string("api_key", None, "API key (default: $OPENAI_API_KEY)")
SCRIPTED = flags.DEFINE_string("scripted", None, "JSON file with a list of replies (or 'oracle' with --bench)")
PROTOCOL = flags.DEFINE_enum("protocol", "auto", ["auto", "internlm2", "openai"],
                             "internlm2 agent: tool protocol (auto: openai for --api_base, else internlm2)")
MAX_STEPS = flags.DEFINE_integer("max_steps", 8, "model calls per task")
MAX_SECONDS = flags.DEFINE_float("max_seconds", 300.0, "wall-clock budget per task")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "tokens per model reply")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature")
SYSTEM = flags.DEFINE_string("system", None, "extra system prompt")
WORKDIR = flags.DEFINE_string("workdir", None, "working directory for files, plots and the interpreter")
DOCUMENTS = flags.DEFINE_string("documents", None, "search tool collection: .jsonl file or folder of .txt files")
BENCH = flags.DEFINE_bool("bench", False, "run the tool-use benchmark instead of --task")
OUTPUT = flags.DEFINE_string("output", None, "write the result (or benchmark report) as JSON here")
QUIET = flags.DEFINE_bool("quiet", False, "do not print the trace")


def make_llm():
  sources = [f for f, v in (("--checkpoint", CHECKPOINT.value), ("--api_base", API_BASE.value),
                            ("--scripted", SCRIPTED.value)) if v]
  if len(sources) != 1:
    raise app.UsageError("give exactly one model source: --checkpoint, --api_base (with --model) or --scripted"
                         + (f" (got {', '.join(sources)})" if sources else ""))
  if API_BASE.value:
    if not MODEL.value:
      raise app.UsageError("--api_base needs --model")
    return OpenAIClient(API_BASE.value, MODEL.value, api_key=API_KEY.value)
  if CHECKPOINT.value:
    llm_class = EngineLLM if BACKEND.value == "engine" else InProcessLLM
    return llm_class.from_checkpoint(CHECKPOINT.value)
  if SCRIPTED.value == "oracle":
    if not BENCH.value:
      raise app.UsageError("--scripted=oracle only answers benchmark tasks; add --bench")
    from internlm_jax.agent.bench import oracle_llm
    return oracle_llm(AGENT.value)
  try:
    with open(SCRIPTED.value) as f:
      replies = json.load(f)
  except ValueError as e:  # the decoder's message alone does not say which file
    raise ValueError(f"--scripted={SCRIPTED.value} is not valid JSON: {e}") from None
  if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
    raise app.UsageError(f"{SCRIPTED.value} must hold a JSON list of reply strings")
  return ScriptedLLM(replies)


def print_step(step: Step) -> None:
  if QUIET.value:
    return
  head = f"[{step.elapsed_s:6.2f}s] {step.kind}"
  if step.kind == "action":
    args = step.args if isinstance(step.args, str) else json.dumps(step.args, ensure_ascii=False)
    print(f"{head}: {step.tool} {args}", flush=True)
  elif step.kind == "observation":
    print(f"{head} ({step.status}):\n  " + step.content.replace("\n", "\n  "), flush=True)
  else:
    print(f"{head}: {step.content}", flush=True)


def make_agent(llm, tools):
  kwargs = dict(max_steps=MAX_STEPS.value, max_seconds=MAX_SECONDS.value, on_step=print_step,
                max_tokens=MAX_TOKENS.value, temperature=TEMPERATURE.value, system=SYSTEM.value)
  if AGENT.value == "internlm2":
    kwargs["protocol"] = None if PROTOCOL.value == "auto" else PROTOCOL.value
  return AGENTS[AGENT.value](llm, tools, **kwargs)


def write(payload) -> None:
  if OUTPUT.value:
    with open(OUTPUT.value, "w") as f:
      json.dump(payload, f, indent=2, ensure_ascii=False)
    print(f"wrote {OUTPUT.value}")


def main(argv):
  del argv
  try:
    llm = make_llm()
  except (OSError, ValueError) as e:  # a missing or malformed --scripted file or --checkpoint folder
    sys.exit(f"error: {e}")
  try:
    run(llm)
  finally:
    if hasattr(llm, "close"):  # EngineLLM: stop the engine's scheduler thread
      llm.close()


def run(llm) -> None:
  if BENCH.value:
    from internlm_jax.agent.bench import format_report, run_benchmark
    fresh = (lambda: make_llm()) if isinstance(llm, ScriptedLLM) else (lambda: llm)  # scripts restart per task
    report = run_benchmark(lambda tools: make_agent(fresh(), tools))
    print(format_report(report))
    write(report)
    return
  if not TASK.value:
    raise app.UsageError("--task is required (or --bench)")
  workdir = WORKDIR.value or tempfile.mkdtemp(prefix="agent_")
  os.makedirs(workdir, exist_ok=True)
  try:
    tools = builtin_tools(TOOLS.value, workdir=workdir, documents=DOCUMENTS.value)
  except (OSError, ValueError) as e:  # an unknown tool name, or search without --documents
    sys.exit(f"error: {e}")
  agent = make_agent(llm, tools)
  try:
    result = agent.run(TASK.value)
  finally:
    agent.close()
  print(f"status: {result.status}" + (f" ({result.error})" if result.error else ""))
  print(f"final answer: {result.final_answer}")
  write(result.to_dict())


if __name__ == "__main__":
  app.run(main)
