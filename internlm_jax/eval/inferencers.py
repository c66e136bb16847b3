"""The three paradigms, each cached per request and run in chunks with a progress bar:

- gen: free generation (plain prompts through `backend.generate`, chat messages through `backend.chat`), n
  samples per prompt for pass@k (sample j uses seed j);
- loglikelihood: sum log p(continuation | context) and whether greedy decoding would produce it (lm-eval);
  the ppl paradigm (OpenCompass's PPLInferencer: lowest per-token loss wins) is the same numbers divided by the
  continuation's token count, which is returned too;
- rolling: every token of a document, for perplexity and bits per byte.
Identical requests are computed once; results land in the cache after every chunk, so an interrupted run
resumes with only the missing requests.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from internlm_jax.eval import backends as backends_lib
from internlm_jax.eval.cache import SampleCache, request_key
from internlm_jax.tokenizer import render_chat


def _cached_map(keys: list[str], items: list[Any], compute: Callable[[list[Any]], list[Any]], cache: SampleCache,
                chunk_size: int, desc: str, progress: bool) -> list[Any]:
  todo: dict[str, Any] = {}
  for key, item in zip(keys, items):
    if key not in cache and key not in todo:
      todo[key] = item
  pending = list(todo.items())
  if pending:
    with tqdm(total=len(pending), desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
      for start in range(0, len(pending), chunk_size):
        chunk = pending[start:start + chunk_size]
        values = compute([item for _, item in chunk])
        if len(values) != len(chunk):
          raise backends_lib.BackendError(f"{desc}: asked for {len(chunk)} results, got {len(values)}")
        cache.put_many({key: value for (key, _), value in zip(chunk, values)})
        bar.update(len(chunk))
  return [cache.get(key) for key in keys]


def generate(backend, prompts: Sequence[str | list[dict]], *, max_tokens: int, stop: Sequence[str] = (),
             temperature: float = 0.0, num_samples: int = 1, cache: SampleCache, chunk_size: int = 64,
             desc: str = "gen", progress: bool = True) -> list[list[str]]:
  """`num_samples` completions of each prompt (a string, or chat messages)."""
  if num_samples > 1 and temperature <= 0:
    raise backends_lib.BackendError(f"num_samples={num_samples} needs temperature > 0 (greedy samples are "
                                    "identical)")
  settings = {"max_tokens": int(max_tokens), "stop": list(stop), "temperature": float(temperature)}
  keys, items = [], []
  for prompt in prompts:
    for j in range(num_samples):
      keys.append(request_key("gen", prompt, settings, j))
      items.append((prompt, j))

  def compute(batch):
    out: list[Any] = [None] * len(batch)
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, (prompt, seed) in enumerate(batch):
      groups.setdefault((isinstance(prompt, list), seed), []).append(i)
    for (is_chat, seed), rows in groups.items():
      fn = backend.chat if is_chat else backend.generate
      texts = fn([batch[i][0] for i in rows], max_tokens=max_tokens, stop=list(stop), temperature=temperature,
                 seed=seed)
      for i, text in zip(rows, texts):
        out[i] = text
    return out

  flat = _cached_map(keys, items, compute, cache, chunk_size, desc, progress)
  return [flat[i:i + num_samples] for i in range(0, len(flat), num_samples)]


def as_context(backend, prompt: str | list[dict]) -> str:
  """A scoring context: chat messages are rendered with the InternLM2 template up to the assistant turn."""
  if isinstance(prompt, str):
    return prompt
  text = render_chat(prompt, add_generation_prompt=True)
  return text[len("<s>"):] if text.startswith("<s>") else text  # scoring adds <s> itself


def loglikelihood(backend, requests: Sequence[tuple[str, str]], *, cache: SampleCache, chunk_size: int = 256,
                  desc: str = "loglikelihood", progress: bool = True) -> list[tuple[float, bool, int]]:
  """(sum log p(continuation | context), is greedy, continuation tokens) per (context, continuation)."""
  tok = backends_lib._need_tokenizer(backend)
  pairs = [backends_lib.encode_pair(tok, c, x) for c, x in requests]
  keys = [request_key("ll", ctx, cont, backend.max_length) for ctx, cont in pairs]

  def compute(batch):
    return [[lp, greedy, len(cont)] for (lp, greedy), (_, cont) in
            zip(backend.loglikelihood_tokens(batch), batch)]

  return [tuple(v) for v in _cached_map(keys, pairs, compute, cache, chunk_size, desc, progress)]


def rolling(backend, texts: Sequence[str], *, cache: SampleCache, stride: int | None = None, chunk_size: int = 16,
            desc: str = "perplexity", progress: bool = True) -> list[tuple[float, int]]:
  """(sum log p of every token, token count) per document."""
  keys = [request_key("rolling", t, backend.max_length, stride) for t in texts]

  def compute(batch):
    return [list(x) for x in backends_lib.rolling_loglikelihood(backend, batch, stride=stride)]

  return [tuple(v) for v in _cached_map(keys, list(texts), compute, cache, chunk_size, desc, progress)]
