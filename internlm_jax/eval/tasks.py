"""One dataset's evaluation per mode: build requests from samples, run the inferencer, score every sample.

Each task returns (score rows, per-sample prediction records, extra results). Score rows are
{"metric", "mode", "score"}; the runner adds the dataset name and version. Modes:
  gen          generate, extract the answer (`metric`: accuracy | gsm8k | math | exact_match | bleu | rouge |
               humaneval)
  ppl / ll     multiple choice by scoring each option's continuation: lowest per-token loss (ppl) or highest
               total log-likelihood (ll)
  perplexity   documents: perplexity per token and bits per byte
  needle       needle-in-a-haystack (needle.py)
"""
from __future__ import annotations

from typing import Any, Mapping

from internlm_jax import sandbox
from internlm_jax.eval import datasets, humaneval, inferencers, metrics, templates
from internlm_jax.eval.cache import SampleCache

GEN_METRICS = ("accuracy", "gsm8k", "math", "exact_match", "bleu", "rouge", "humaneval")
MODES = ("gen", "ppl", "ll", "perplexity", "needle")


class TaskError(ValueError):
  """A dataset config asks for an impossible combination (a mode with the wrong metric, a missing field)."""


def _same_source(ds: Mapping[str, Any]) -> bool:
  """Whether the few-shot pool is the evaluated set itself (then a sample never serves as its own example)."""
  return (ds.get("fewshot_path") or ds.get("path", "")) == ds.get("path", "") and not ds.get("fewshot_reader")


def _prompts(ds: Mapping[str, Any], samples: list[dict], pool: list[dict]) -> list:
  template = dict(ds.get("template") or {})
  how, seed, shots = ds.get("fewshot", "first"), int(ds.get("seed", 0)), int(ds.get("num_shots", 0))
  same = _same_source(ds)
  return [templates.build_prompt(template, s, templates.pick_shots(pool, s, shots, how, seed, same))
          for s in samples]


def _show(prompt) -> str:
  return prompt if isinstance(prompt, str) else templates.flatten_chat(prompt)


def _extract(metric: str, text: str, sample: dict) -> tuple[str | None, bool]:
  reference = sample.get("reference")
  if metric == "accuracy":
    pred = metrics.extract_option(text, sample.get("labels") or "ABCD")
    return pred, pred == reference
  if metric == "gsm8k":
    pred = metrics.last_number(text)
    return pred, metrics.numbers_equal(pred, str(reference))
  if metric == "math":
    pred = metrics.last_boxed(text)
    return pred, metrics.math_equal(pred, str(reference))
  if metric == "exact_match":
    return text.strip(), text.strip() == str(reference).strip()
  return text, False


def run_gen(backend, ds: Mapping[str, Any], samples: list[dict], pool: list[dict], cache: SampleCache, *,
            progress: bool, workers: int, desc: str):
  metric = ds.get("metric", "accuracy")
  if metric not in GEN_METRICS:
    raise TaskError(f"mode 'gen' supports metrics {GEN_METRICS}, got {metric!r}")
  gen = dict(ds.get("gen") or {})
  n = int(gen.get("num_samples", 1))
  if metric == "humaneval":
    prompts = [s["prompt"] for s in samples]  # the code prompt itself is the model input
    if (ds.get("template") or {}).get("chat"):
      prompts = [[{"role": "user", "content": templates.render(ds["template"]["prompt"], s)}] for s in samples]
  else:
    prompts = _prompts(ds, samples, pool)
  outputs = inferencers.generate(
      backend, prompts, max_tokens=int(gen.get("max_tokens", 256)), stop=list(gen.get("stop", [])),
      temperature=float(gen.get("temperature", 0.0)), num_samples=n, cache=cache,
      chunk_size=int(ds.get("chunk_size", 64)), desc=desc, progress=progress)
  records = [{"id": s["id"], "prompt": _show(p), "prediction": outs[0] if n == 1 else outs,
              "reference": s.get("reference")} for s, p, outs in zip(samples, prompts, outputs)]
  if metric == "humaneval":
    limits = sandbox.SandboxLimits(**dict(ds.get("sandbox") or {})) if ds.get("sandbox") else humaneval.DEFAULT_LIMITS
    ks = [int(k) for k in ds.get("ks", [1])]
    scores, per_problem = humaneval.evaluate(samples, outputs, ks, limits=limits, workers=workers,
                                             progress=progress)
    for record, runs in zip(records, per_problem):
      record.update(passed=[r["passed"] for r in runs], reasons=[r["reason"] for r in runs])
      record["reference"] = None
    return [{"metric": k, "mode": "gen", "score": v} for k, v in scores.items()], records, {}
  texts = [outs[0] for outs in outputs]
  if metric == "bleu":
    score = metrics.bleu(texts, [str(s["reference"]) for s in samples])
    return [{"metric": "bleu", "mode": "gen", "score": score}], records, {}
  if metric == "rouge":
    scores = metrics.rouge(texts, [str(s["reference"]) for s in samples])
    return [{"metric": k, "mode": "gen", "score": v} for k, v in scores.items()], records, {}
  correct = 0
  for record, text, sample in zip(records, texts, samples):
    pred, ok = _extract(metric, text, sample)
    record.update(extracted=pred, correct=ok)
    correct += ok
  return [{"metric": "accuracy", "mode": "gen", "score": 100.0 * correct / len(samples)}], records, {}


def run_choice(backend, ds: Mapping[str, Any], samples: list[dict], pool: list[dict], cache: SampleCache, *,
               mode: str, progress: bool, desc: str):
  template = dict(ds.get("template") or {})
  prompts = _prompts(ds, samples, pool)
  requests, owners = [], []
  for i, (sample, prompt) in enumerate(zip(samples, prompts)):
    context = inferencers.as_context(backend, prompt)
    for continuation in templates.option_continuations(template, sample):
      requests.append((context, continuation))
      owners.append(i)
  scores = inferencers.loglikelihood(backend, requests, cache=cache, chunk_size=int(ds.get("chunk_size", 256)),
                                     desc=desc, progress=progress)
  per_sample: list[list[tuple[float, bool, int]]] = [[] for _ in samples]
  for owner, score in zip(owners, scores):
    per_sample[owner].append(score)
  records, correct = [], 0
  for sample, prompt, opts in zip(samples, prompts, per_sample):
    if mode == "ppl":  # lowest mean per-token loss
      values = [-lp / max(n, 1) for lp, _, n in opts]
      best = min(range(len(values)), key=values.__getitem__)
    else:  # highest total log-likelihood
      values = [lp for lp, _, _ in opts]
      best = max(range(len(values)), key=values.__getitem__)
    pred = sample["labels"][best]
    ok = pred == sample["reference"]
    correct += ok
    records.append({"id": sample["id"], "prompt": _show(prompt), "prediction": pred, "reference":
                    sample["reference"], "correct": ok, "option_scores": dict(zip(sample["labels"], values))})
  return [{"metric": "accuracy", "mode": mode, "score": 100.0 * correct / len(samples)}], records, {}


def run_perplexity(backend, ds: Mapping[str, Any], samples: list[dict], cache: SampleCache, *, progress: bool,
                   desc: str):
  texts = [s["text"] for s in samples]
  stride = ds.get("stride") or None
  results = inferencers.rolling(backend, texts, cache=cache, stride=stride, desc=desc, progress=progress)
  total_lp = sum(lp for lp, _ in results)
  total_tokens = sum(n for _, n in results)
  total_bytes = sum(len(t.encode("utf-8")) for t in texts)
  records = [{"id": s["id"], "logprob": lp, "tokens": n, "bytes": len(s["text"].encode("utf-8")),
              "perplexity": metrics.perplexity(lp, n)} for s, (lp, n) in zip(samples, results)]
  rows = [{"metric": "perplexity", "mode": "ppl", "score": metrics.perplexity(total_lp, total_tokens)},
          {"metric": "bits_per_byte", "mode": "ppl", "score": metrics.bits_per_byte(total_lp, total_bytes)}]
  return rows, records, {"tokens": total_tokens, "bytes": total_bytes, "logprob": total_lp}


def load_samples(ds: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
  """(evaluated samples, few-shot pool)."""
  loader = ds.get("loader", "jsonl")
  reader = dict(ds.get("reader") or {})
  samples = datasets.load(loader, ds.get("path", ""), limit=int(ds.get("limit", 0)), **reader)
  pool: list[dict] = []
  if int(ds.get("num_shots", 0)) > 0:
    fewshot_reader = dict(reader, **dict(ds.get("fewshot_reader") or {}))
    pool = datasets.load(loader, ds.get("fewshot_path") or ds.get("path", ""), **fewshot_reader)
  return samples, pool
