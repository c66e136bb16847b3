"""Needle in a haystack: a fact hidden at a grid of depths in contexts of a grid of lengths, then asked for.

The haystack is held-out corpus text (Shakespeare's validation plays, or any text file), cut to each length in
tokens (characters / 4 when the backend has no tokenizer); the needle goes in at the sentence boundary nearest
below each depth. A trial scores 1 when the answer contains the key (the needle's secret), else 0, as CDME's
keyword check does without its fuzzy partial credit. The result is a depth x length grid and a heatmap PNG.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from internlm_jax.eval import inferencers
from internlm_jax.eval.cache import SampleCache

NEEDLE = "The special magic number hidden in this book is {key}."
QUESTION = "What is the special magic number hidden in this book?"
KEY = "7481"
PROMPT = ("This is a very long story book: <book>{context}</book>.\n"
          "Based on the content of the book, Question: {question}\nAnswer:")


def haystack_text(source: str = "shakespeare") -> str:
  if source == "shakespeare":
    from internlm_jax.data import corpus
    parts = []
    for path in corpus.shakespeare_files("validation"):
      with open(path, encoding="utf-8", errors="replace") as f:
        parts.append(f.read())
    return "\n\n".join(parts)
  if not os.path.isfile(source):
    raise ValueError(f"needle haystack {source!r}: not 'shakespeare' and not a text file")
  with open(source, encoding="utf-8", errors="replace") as f:
    return f.read()


def _count(backend, text: str) -> int:
  tok = backend.tokenizer
  return len(tok.encode(text)) if tok is not None else (len(text) + 3) // 4


def _cut(backend, haystack: str, budget: int) -> str:
  """The longest prefix of the haystack that is at most `budget` tokens."""
  tok = backend.tokenizer
  if budget <= 0:
    return ""
  if tok is None:
    return haystack[:budget * 4]
  # No token is longer than 16 characters in practice: encode only the prefix that can matter.
  ids = tok.encode(haystack[:budget * 16])
  if len(ids) < budget:
    raise ValueError(f"the haystack is too short for {budget} tokens")
  return tok.decode(ids[:budget])


def insert_needle(context: str, needle: str, depth_percent: float) -> str:
  """`context` with `needle` inserted after the last sentence end at or before depth% of its length."""
  pos = int(len(context) * max(0.0, min(100.0, depth_percent)) / 100.0)
  if pos >= len(context):
    return context.rstrip() + " " + needle
  cut = max(context.rfind(". ", 0, pos + 1), context.rfind("\n", 0, pos + 1))
  cut = 0 if cut < 0 else cut + 1
  return context[:cut] + (" " if cut else "") + needle + " " + context[cut:].lstrip(" ")


def build_trials(backend, cfg: Mapping[str, Any]) -> list[dict]:
  lengths = [int(x) for x in cfg.get("lengths", [256, 512])]
  depths = [float(x) for x in cfg.get("depths", [0, 25, 50, 75, 100])]
  key = str(cfg.get("key", KEY))
  needle = str(cfg.get("needle", NEEDLE)).format(key=key)
  question = str(cfg.get("question", QUESTION))
  prompt = str(cfg.get("prompt", PROMPT))
  max_tokens = int((cfg.get("gen") or {}).get("max_tokens", 24))
  haystack = haystack_text(cfg.get("haystack", "shakespeare"))
  overhead = _count(backend, prompt.format(context="", question=question)) + _count(backend, needle) + 8
  trials = []
  for length in lengths:
    if length + max_tokens > backend.max_length:
      raise ValueError(f"needle length {length} + {max_tokens} answer tokens exceeds the backend's "
                       f"max_length={backend.max_length}")
    context = _cut(backend, haystack, length - overhead)
    for depth in depths:
      text = prompt.format(context=insert_needle(context, needle, depth), question=question)
      if cfg.get("chat"):
        text = [{"role": "user", "content": text}]
      trials.append({"id": f"len{length}_depth{depth:g}", "length": length, "depth": depth, "prompt": text,
                     "reference": key})
  return trials


def run(backend, cfg: Mapping[str, Any], cache: SampleCache, out_dir: str, *, progress: bool, desc: str):
  trials = build_trials(backend, cfg)
  gen = dict(cfg.get("gen") or {})
  outputs = inferencers.generate(backend, [t["prompt"] for t in trials], max_tokens=int(gen.get("max_tokens", 24)),
                                 stop=list(gen.get("stop", ["\n"])), temperature=0.0, cache=cache,
                                 chunk_size=int(cfg.get("chunk_size", 16)), desc=desc, progress=progress)
  records = []
  for trial, outs in zip(trials, outputs):
    score = 1.0 if trial["reference"] in outs[0] else 0.0
    prompt = trial["prompt"] if isinstance(trial["prompt"], str) else trial["prompt"][0]["content"]
    records.append({"id": trial["id"], "length": trial["length"], "depth": trial["depth"],
                    "prediction": outs[0], "reference": trial["reference"], "score": score,
                    "prompt_tail": prompt[-200:]})
  lengths = sorted({r["length"] for r in records})
  depths = sorted({r["depth"] for r in records})
  grid = [[next(r["score"] for r in records if r["length"] == n and r["depth"] == d) for n in lengths]
          for d in depths]
  png = os.path.join(out_dir, "needle_heatmap.png")
  heatmap(grid, lengths, depths, png, title=f"{backend.name}: needle in a haystack")
  mean = 100.0 * sum(r["score"] for r in records) / len(records)
  return [{"metric": "retrieval", "mode": "gen", "score": mean}], records, {
      "grid": grid, "lengths": lengths, "depths": depths, "heatmap": png}


def heatmap(grid: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float], path: str,
            title: str = "") -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.7 * len(lengths)), max(3.0, 1.2 + 0.4 * len(depths))))
  image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  for i, row in enumerate(grid):
    for j, value in enumerate(row):
      ax.text(j, i, f"{value:.0%}" if value in (0.0, 1.0) else f"{value:.2f}", ha="center", va="center",
              fontsize=7)
  fig.colorbar(image, ax=ax, label="retrieved")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
