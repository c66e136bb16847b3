"""Test fixtures: a minimal OpenAI-compatible server over an InProcessBackend, bound to loopback only.

It implements just what the evaluator sends (GET /v1/models, POST /v1/completions with text or token-id prompts,
echo + logprobs scoring, POST /v1/chat/completions), so tests can check that the HTTP path and the in-process
path give the same numbers without the serving engine. `fail_first=N` answers the first N requests with 503,
to exercise the client's retries.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import threading
from typing import Iterator

from internlm_jax.eval.backends import InProcessBackend, cut_at_stop


def _logprobs_object(backend: InProcessBackend, ids: list[int]) -> dict:
  (lp, top, top_lp), = backend.score_ids([ids])
  vocab = backend.tokenizer.vocab_size
  text = lambda t: backend.tokenizer.decode([int(t)]) if t < vocab else ""
  return {"tokens": [text(t) for t in ids], "token_logprobs": [None] + [float(x) for x in lp],
          "top_logprobs": [None] + [{text(t): float(v)} for t, v in zip(top, top_lp)],
          "text_offset": [0] * len(ids)}


class _Handler(http.server.BaseHTTPRequestHandler):
  server: "_Server"

  def log_message(self, *args):  # keep test output clean
    pass

  def _send(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _should_fail(self) -> bool:
    with self.server.lock:
      self.server.requests += 1
      return self.server.requests <= self.server.fail_first

  def do_GET(self):  # noqa: N802
    if self._should_fail():
      return self._send(503, {"error": {"message": "warming up"}})
    if self.path == "/v1/models":
      b = self.server.backend
      return self._send(200, {"object": "list", "data": [{"id": self.server.model, "max_model_len": b.max_length}]})
    self._send(404, {"error": {"message": f"no route {self.path}"}})

  def do_POST(self):  # noqa: N802
    if self._should_fail():
      return self._send(503, {"error": {"message": "warming up"}})
    req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    if req.get("model") != self.server.model:
      return self._send(404, {"error": {"message": f"model {req.get('model')!r} not found"}})
    b = self.server.backend
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if self.path == "/v1/completions":
      prompts = req["prompt"]
      if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
      ids = [b.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
      if req.get("echo") and req.get("logprobs") is not None:
        if req.get("max_tokens", 16) != 0:
          return self._send(400, {"error": {"message": "the fake server scores only with max_tokens=0"}})
        choices = [{"index": i, "text": b.tokenizer.decode(p), "logprobs": _logprobs_object(b, p),
                    "finish_reason": "length"} for i, p in enumerate(ids)]
      else:
        texts = b.generate_ids(ids, req.get("max_tokens", 16), req.get("temperature", 1.0), req.get("seed", 0))
        choices = [{"index": i, "text": cut_at_stop(t, stop), "logprobs": None, "finish_reason": "stop"}
                   for i, t in enumerate(texts)]
      return self._send(200, {"object": "text_completion", "model": self.server.model, "choices": choices})
    if self.path == "/v1/chat/completions":
      text, = b.chat([req["messages"]], max_tokens=req.get("max_tokens", 16), stop=stop,
                     temperature=req.get("temperature", 1.0), seed=req.get("seed", 0))
      return self._send(200, {"object": "chat.completion", "model": self.server.model, "choices": [
          {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
    self._send(404, {"error": {"message": f"no route {self.path}"}})


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, backend: InProcessBackend, model: str, fail_first: int):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.backend, self.model, self.fail_first = backend, model, fail_first
    self.requests, self.lock = 0, threading.Lock()


@contextlib.contextmanager
def fake_openai_server(backend: InProcessBackend, model: str = "tiny", fail_first: int = 0) -> Iterator[str]:
  """Serves `backend` on 127.0.0.1 (a free port) while the block runs; yields the base URL (`.../v1`)."""
  server = _Server(backend, model, fail_first)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


CORPUS = ("Question: What is 2 + 3? Answer: 5. The quick brown fox jumps over the lazy dog.\n"
          "Which option is right? A. red B. green C. blue D. yellow. Answer: B\n"
          "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
          "ROMEO: But soft, what light through yonder window breaks? It is the east.\n"
          "Numbers 0 1 2 3 4 5 6 7 8 9 and \\boxed{42} with punctuation , . ! ? ; : ( ) [ ] { } \" '\n")


def tiny_backend(directory: str, *, seed: int = 0, batch_size: int = 4, name: str = "tiny", max_length=None):
  """An InProcessBackend over a random `tiny` model and a ~400-piece tokenizer trained on CORPUS."""
  import os

  import jax

  from internlm_jax.config import PRESETS
  from internlm_jax.model import init_params
  from internlm_jax.tokenizer import Tokenizer, train_tokenizer

  path = os.path.join(directory, "tiny_tok.model")
  if not os.path.exists(path):
    train_tokenizer(os.path.join(directory, "tiny_tok"), 400, texts=[CORPUS * 8])
  config = PRESETS["tiny"]
  params = init_params(config, jax.random.key(seed))
  return InProcessBackend(params, config, Tokenizer(path), name=name, batch_size=batch_size,
                          max_length=max_length)


class ScriptedBackend:
  """A Backend without a model, for fast pipeline tests: `answer(prompt)` gives each generation, `score(context,
  continuation)` each log-likelihood (default: longer continuations are less likely). Counts its calls so tests
  can check that cached work is not recomputed."""

  def __init__(self, answer=lambda prompt: "", score=None, *, tokenizer=None, name: str = "scripted",
               max_length: int = 4096, fail_after: int | None = None):
    self.answer, self.tokenizer, self.name, self.max_length = answer, tokenizer, name, max_length
    self.score = score or (lambda ctx, cont: -float(len(cont)))
    self.fingerprint = f"scripted:{name}"
    self.calls, self.fail_after = 0, fail_after

  def _tick(self, n: int) -> None:
    if self.fail_after is not None and self.calls + n > self.fail_after:
      raise KeyboardInterrupt("scripted interruption")
    self.calls += n

  def generate(self, prompts, *, max_tokens, stop=(), temperature=0.0, seed=0):
    self._tick(len(prompts))
    return [cut_at_stop(self.answer(p), stop) for p in prompts]

  def chat(self, conversations, *, max_tokens, stop=(), temperature=0.0, seed=0):
    self._tick(len(conversations))
    return [cut_at_stop(self.answer(c), stop) for c in conversations]

  def loglikelihood_tokens(self, requests):
    self._tick(len(requests))
    return [(self.score(list(ctx), list(cont)), False) for ctx, cont in requests]


class CharTokenizer:
  """One token per character (id = code point + 3; <s> = 1, </s> = 2): a tokenizer stand-in for scripted tests."""
  bos_id, eos_id, vocab_size = 1, 2, 0x110000 + 3
  stop_token_ids = [2]

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    return ([1] if add_bos else []) + [ord(c) + 3 for c in text] + ([2] if add_eos else [])

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return "".join(chr(i - 3) for i in ids if i >= 3)
