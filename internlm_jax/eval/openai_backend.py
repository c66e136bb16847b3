"""A Backend over any OpenAI-compatible HTTP endpoint (our serve/ API, vLLM, LMDeploy, ...), stdlib only.

- generation: POST /v1/completions (prompts batched in one request); chat: POST /v1/chat/completions, one
  conversation per request, several in flight.
- log-likelihood: POST /v1/completions with `echo=True, logprobs=1, max_tokens=0` and token-id prompts, as
  lm-eval's local-completions does: the client tokenizes, so the scored tokens are exactly the in-process ones.
  With a tokenizer, generation prompts are sent as token ids too (`<s>` first), for the same reason.
Transient failures (connection errors, timeouts, 429, 5xx) are retried with exponential backoff; any other
error raises BackendError with the server's message.
"""
from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from internlm_jax.eval.backends import BackendError, Messages, TokenRequest, cut_at_stop
from internlm_jax.tokenizer import Tokenizer

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


class OpenAIBackend:

  def __init__(self, api_base: str, model: str, *, tokenizer: Tokenizer | None = None, api_key: str = "",
               batch_size: int = 8, concurrency: int = 4, timeout_s: float = 300.0, max_retries: int = 4,
               max_length: int | None = None, name: str | None = None):
    if not api_base.startswith(("http://", "https://")):
      raise BackendError(f"--api_base must be an http(s) URL, got {api_base!r}")
    if not timeout_s > 0 or max_retries < 0:
      raise BackendError(f"the endpoint timeout must be > 0 s and retries >= 0, got {timeout_s} and {max_retries}")
    base = api_base.rstrip("/")
    self.api_base = base if base.endswith("/v1") else base + "/v1"
    self.model, self.tokenizer, self.api_key = model, tokenizer, api_key
    self.batch_size, self.concurrency = int(batch_size), int(concurrency)
    self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
    self.name = name or model
    self.fingerprint = f"api:{self.api_base}:{model}"
    self.max_length = int(max_length or self._served_length() or 4096)

  # ---- transport -------------------------------------------------------------------------------------------
  def _request(self, path: str, payload: dict | None = None) -> dict[str, Any]:
    url = self.api_base + path
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    delay, last = 0.5, ""
    for attempt in range(self.max_retries + 1):
      request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          body = response.read()
        try:
          return json.loads(body)
        except ValueError:  # a web page or another service on that port: retrying will not help
          text = " ".join(body.decode("utf-8", errors="replace").split())[:200]
          raise BackendError(f"{url} answered with something that is not JSON (is --api_base an OpenAI-"
                             f"compatible endpoint?): {text!r}") from None
      except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", errors="replace")
        try:
          message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
          message = " ".join(body.split())[:300]  # an HTML error page, on one line
        last = f"HTTP {e.code} from {url}: {message}"
        if e.code not in RETRY_STATUS:
          raise BackendError(last) from None
      except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        last = f"{url}: {getattr(e, 'reason', e)}"
      if attempt < self.max_retries:
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    raise BackendError(f"giving up after {self.max_retries + 1} attempts: {last}")

  def _served_length(self) -> int | None:
    try:
      models = self._request("/models").get("data", [])
    except BackendError:
      return None
    for m in models:
      if m.get("id") == self.model:
        return m.get("max_model_len") or m.get("context_length")
    return None

  def _prompt(self, text: str) -> Any:
    if self.tokenizer is None:
      return text
    return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

  # ---- Backend ---------------------------------------------------------------------------------------------
  def generate(self, prompts: list[str], *, max_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0,
               seed: int = 0) -> list[str]:
    out: list[str] = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = [self._prompt(p) for p in prompts[start:start + self.batch_size]]
      payload = {"model": self.model, "prompt": chunk, "max_tokens": int(max_tokens),
                 "temperature": float(temperature), "seed": int(seed)}
      if stop:
        payload["stop"] = list(stop)
      choices = _choices(self._request("/completions", payload), "/completions")
      if len(choices) != len(chunk):
        raise BackendError(f"asked for {len(chunk)} completions, the server returned {len(choices)}")
      out += [cut_at_stop(c["text"] or "", stop) for c in choices]
    return out

  def chat(self, conversations: list[Messages], *, max_tokens: int, stop: Sequence[str] = (),
           temperature: float = 0.0, seed: int = 0) -> list[str]:
    def one(messages):
      payload = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                 "temperature": float(temperature), "seed": int(seed)}
      if stop:
        payload["stop"] = list(stop)
      message = _choices(self._request("/chat/completions", payload), "/chat/completions")[0].get("message")
      return cut_at_stop((message or {}).get("content") or "", stop)

    with concurrent.futures.ThreadPoolExecutor(max(1, self.concurrency)) as pool:
      return list(pool.map(one, conversations))

  def loglikelihood_tokens(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]:
    if self.tokenizer is None:
      raise BackendError("log-likelihood over the API sends token ids; pass --tokenizer=PATH")
    seqs, spans = [], []
    for ctx, cont in requests:
      full = list(ctx) + list(cont)
      if len(full) > self.max_length:
        full = full[len(full) - self.max_length:]
      if len(cont) >= len(full):
        raise BackendError(f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
      seqs.append(full)
      spans.append(len(cont))
    results: list[tuple[float, bool]] = []
    for start in range(0, len(seqs), self.batch_size):
      chunk = seqs[start:start + self.batch_size]
      payload = {"model": self.model, "prompt": chunk, "max_tokens": 0, "echo": True, "logprobs": 1,
                 "temperature": 0.0}
      choices = _choices(self._request("/completions", payload), "/completions")
      if len(choices) != len(chunk):
        raise BackendError(f"asked for {len(chunk)} scores, the server returned {len(choices)}")
      for choice, seq, n in zip(choices, chunk, spans[start:start + self.batch_size]):
        results.append(_continuation_score(choice.get("logprobs"), len(seq), n))
    return results


def _choices(response: Any, path: str) -> list[dict]:
  """The response's choices in index order; a BackendError, not a KeyError, when the server answered otherwise."""
  choices = response.get("choices") if isinstance(response, dict) else None
  if not choices or not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
    raise BackendError(f"{path}: the server's answer has no 'choices' (is --api_base an OpenAI-compatible "
                       f"endpoint?): {json.dumps(response)[:200]}")
  return sorted(choices, key=lambda c: c.get("index", 0))


def _continuation_score(logprobs: dict | None, length: int, n: int) -> tuple[float, bool]:
  """Sum of the last n prompt-token logprobs; greedy when each is the top-1 candidate."""
  if not logprobs or len(logprobs.get("token_logprobs") or []) < length:
    raise BackendError("the server did not return prompt logprobs; it must support echo=True with logprobs "
                       "and max_tokens=0 (as vLLM and our serve API do)")
  lps = logprobs["token_logprobs"][length - n:length]
  tops = (logprobs.get("top_logprobs") or [None] * length)[length - n:length]
  tokens = (logprobs.get("tokens") or [None] * length)[length - n:length]
  greedy = True
  for lp, top, token in zip(lps, tops, tokens):
    if lp is None:
      raise BackendError("the server returned no logprob for a continuation token")
    if top:
      best_token, best_lp = max(top.items(), key=lambda kv: kv[1])
      # Compare by text as lm-eval does, and by value so distinct ids that decode alike still count.
      if best_token != token and best_lp > lp + 1e-6:
        greedy = False
  return float(sum(lps)), greedy
