"""The server under abuse, over real HTTP on 127.0.0.1: 100 concurrent streaming clients (some hanging up at
random), hostile request bodies, and a bounded schemathesis run over the OpenAPI schema.

After every storm the allocator must hold all its pages again and the server must answer as before. Bad input
(cases test_serve_api.py does not already cover) must be a 4xx with an OpenAI error body, never a 500. Slow:
a tiny model, but a hundred clients and a few hundred fuzzed requests take a minute or two on 2 cores.
"""
import json
import random
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from internlm_jax.serve.api import create_app
from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.scheduler import Scheduler
from internlm_jax.serve.testing import loopback_server, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.slow

MODEL = "tiny-internlm2"
CLIENTS = 100
STORM_S = 240  # the whole storm must end within this, or the test fails rather than hangs
WORDS = "the quick brown fox jumps over lazy dog weather in Paris numbers tools chat".split()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
  config, params = tiny_model()
  # 40 usable pages for 8 slots of up to 16 pages: a full house must preempt, so that path is stormed too.
  ec = EngineConfig(max_slots=8, max_seq_len=128, page_size=8, num_pages=41, prefill_chunk=128, steps_per_call=4,
                    sample_vocab=tok.vocab_size)
  sched = Scheduler(Engine(params, config, ec), tok, max_queue=CLIENTS + 28).start()
  try:
    app = create_app(sched, tok, MODEL)
    with loopback_server(app, limit_concurrency=CLIENTS + 50, backlog=2 * CLIENTS) as base:
      yield base, sched
  finally:
    sched.stop()


def assert_all_pages_back(sched):
  sched.wait_idle(timeout=60)
  alloc = sched.engine.allocator
  alloc.check_invariants()
  assert alloc.num_available == alloc.usable_pages, sched.stats()
  assert sched.stats()["running"] == 0 and sched.stats()["queued"] == 0


def greedy(base, prompt):
  r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                 "temperature": 0, "ignore_eos": True}, timeout=60)
  assert r.status_code == 200, r.text
  return r.json()["choices"][0]["text"]


def storm_client(base, i, outcomes):
  """One streaming client; a third of them hang up after a few chunks. Records what it saw."""
  rng = random.Random(i)
  # Half share a long prefix, so prefix-cache pages are shared (and reference-counted) under load.
  shared = "The quick brown fox jumps over the lazy dog. " if i % 2 else ""
  text = shared + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
  common = {"model": MODEL, "max_tokens": rng.randint(1, 40), "stream": True, "ignore_eos": rng.random() < 0.8,
            "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": i}
  if i % 3:
    path, body = "/v1/completions", {**common, "prompt": text}
  else:
    path, body = "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": text}]}
  hang_up_after = rng.randint(0, 3) if rng.random() < 0.35 else None
  try:
    with httpx.stream("POST", base + path, json=body, timeout=httpx.Timeout(STORM_S, connect=30)) as r:
      if r.status_code != 200:
        outcomes[i] = ("status", r.status_code, r.read().decode(errors="replace"))
        return
      seen, reasons = 0, []
      for line in r.iter_lines():
        if not line:
          continue
        if hang_up_after is not None and seen >= hang_up_after:
          outcomes[i] = ("hung_up", seen)
          return  # leaving the block closes the connection mid-stream
        seen += 1
        if line == "data: [DONE]":
          outcomes[i] = ("done", reasons)
          return
        chunk = json.loads(line[len("data: "):])
        if "error" in chunk:
          outcomes[i] = ("error_event", chunk)
          return
        reasons += [c["finish_reason"] for c in chunk["choices"] if c.get("finish_reason")]
      outcomes[i] = ("no_done", reasons)
  except Exception as e:  # recorded, so the main thread reports it
    outcomes[i] = ("exception", repr(e))


def test_concurrent_streams_with_disconnects_return_every_page(server):
  base, sched = server
  before = greedy(base, "Numbers 0 1 2 3")
  cancelled_before = sched.finished["cancelled"]
  outcomes = {}
  threads = [threading.Thread(target=storm_client, args=(base, i, outcomes), daemon=True) for i in range(CLIENTS)]
  for t in threads:
    t.start()
  deadline = time.monotonic() + STORM_S
  for t in threads:
    t.join(timeout=max(0.0, deadline - time.monotonic()))
  assert not any(t.is_alive() for t in threads), "some clients never finished"
  kinds = [o[0] for o in outcomes.values()]
  assert len(outcomes) == CLIENTS and set(kinds) <= {"done", "hung_up"}, [o for o in outcomes.values()
                                                                            if o[0] not in ("done", "hung_up")]
  assert all(set(o[1]) <= {"stop", "length"} and len(o[1]) == 1 for o in outcomes.values() if o[0] == "done")
  assert kinds.count("hung_up") >= 10
  assert_all_pages_back(sched)
  assert sched.finished["cancelled"] > cancelled_before  # hang-ups reached the scheduler as cancellations
  # Still serving, and serving the same thing: no cache page or slot state leaked into other requests.
  assert greedy(base, "Numbers 0 1 2 3") == before
  assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"


LONG = "The quick brown fox jumps over the lazy dog. " * 40
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
CMPL = {"model": MODEL, "prompt": "hi"}


def _json(obj) -> bytes:
  return json.dumps(obj).encode()


BAD = [  # (path, raw body, status, words the message must contain)
    # Invalid UTF-8 inside an otherwise well-formed body, and a lone surrogate (valid JSON, not encodable).
    ("/v1/completions", b'{"model": "tiny-internlm2", "prompt": "caf\xe9 \xff"}', 400, "utf-8"),
    ("/v1/chat/completions", b'{"model": "tiny-internlm2", "messages": [{"role": "user", "content": "\xc3("}]}',
     400, "utf-8"),
    ("/v1/completions", b'{"model": "tiny-internlm2", "prompt": "a \\ud800 b"}', 400, "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny-internlm2", "messages": [{"role": "user", "content": "\\udfff"}]}',
     400, "messages"),
    # Huge token budgets, also when streaming (the 400 must come before any 200 stream starts).
    ("/v1/chat/completions", _json({**CHAT, "max_tokens": 2 ** 62}), 400, "context length"),
    ("/v1/chat/completions", _json({**CHAT, "max_completion_tokens": 10 ** 12, "stream": True}), 400,
     "context length"),
    ("/v1/completions", _json({**CMPL, "max_tokens": 10 ** 30, "stream": True}), 400, "context length"),
    # Over-long prompts as text, in chat, and as one prompt of a batch.
    ("/v1/completions", _json({**CMPL, "prompt": LONG}), 400, "context length"),
    ("/v1/chat/completions", _json({**CHAT, "messages": [{"role": "user", "content": LONG}]}), 400,
     "context length"),
    ("/v1/completions", _json({**CMPL, "prompt": ["hi", LONG], "max_tokens": 4}), 400, "context length"),
    # Unknown fields, top-level and nested.
    ("/v1/chat/completions", _json({**CHAT, "functionz": []}), 400, "functionz"),
    ("/v1/chat/completions", _json({**CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}}),
     400, "stream_options.x"),
    ("/v1/chat/completions", _json({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                                    "tool_choice": {"type": "function", "function": {"name": "f", "y": 2}}}),
     400, "tool_choice"),
    # Wrong types and shapes.
    ("/v1/completions", _json({**CMPL, "prompt": {"text": "hi"}}), 400, "prompt"),
    ("/v1/chat/completions", _json({**CHAT, "messages": "hello"}), 400, "messages"),
    ("/v1/chat/completions", _json({**CHAT, "messages": [1, 2]}), 400, "messages"),
    ("/v1/chat/completions", _json({**CHAT, "messages": [{"content": "no role"}]}), 400, "messages"),
    ("/v1/completions", _json({**CMPL, "temperature": "hot"}), 400, "temperature"),
    ("/v1/completions", _json({**CMPL, "max_tokens": 1.5}), 400, "max_tokens"),
    ("/v1/completions", _json({**CMPL, "prompt": [[]]}), 400, "empty"),
    ("/v1/completions", _json({**CMPL, "prompt": [-1, 5]}), 400, "token ids"),
    # Parameters out of range.
    ("/v1/completions", _json({**CMPL, "stop": ["x"] * 100}), 400, "stop"),
    ("/v1/completions", _json({**CMPL, "stop_token_ids": list(range(3, 40))}), 400, "stop token ids"),
    ("/v1/completions", _json({**CMPL, "stop_token_ids": [10 ** 6]}), 400, "stop_token_ids"),
    ("/v1/completions", _json({**CMPL, "logprobs": 21}), 400, "logprobs"),
    ("/v1/chat/completions", _json({**CHAT, "top_logprobs": 2}), 400, "top_logprobs"),
    ("/v1/completions", _json({**CMPL, "seed": -1}), 400, "seed"),
    # Not a JSON object at all: empty, deeply nested, a JSON scalar.
    ("/v1/completions", b"", 400, "body: field required"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    ("/v1/chat/completions", b'"just a string"', 400, "object"),
]


@pytest.mark.parametrize("path,data,status,needle", BAD, ids=[f"{i}-{case[3]}" for i, case in enumerate(BAD)])
def test_hostile_bodies_are_4xx_with_a_clear_message(server, path, data, status, needle):
  base, sched = server
  r = httpx.post(base + path, content=data, headers={"content-type": "application/json"}, timeout=60)
  assert r.status_code == status, (r.status_code, r.text[:500])
  error = r.json()["error"]
  assert error["message"] and needle.lower() in error["message"].lower(), error


def test_hostile_bodies_leave_the_server_whole(server):
  base, sched = server
  assert_all_pages_back(sched)  # the batch whose second prompt was too long released the first one's pages
  assert greedy(base, "hi")


def test_schemathesis_finds_no_server_error(server):
  base, sched = server
  spec = httpx.get(base + "/openapi.json", timeout=10).json()
  schema = schemathesis.openapi.from_dict(spec)
  failures, calls = [], {}

  def our_model(case):
    # A random model name is a 404 before anything else is looked at: give the fuzzer a way past it.
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
      case.body["model"] = MODEL
    return case

  for result in schema.get_all_operations():
    operation = result.ok()
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
      # ~50 examples per endpoint over both modes; a per-example deadline bounds each request.
      @settings(max_examples=25, deadline=30_000, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
      @given(case=operation.as_strategy(mode).map(our_model))
      def check(case):
        response = case.call(base_url=base, timeout=30)
        calls[operation.label] = calls.get(operation.label, 0) + 1
        if response.status_code >= 500:
          failures.append((operation.label, mode.value, response.status_code, case.body, response.text[:300]))
      try:
        check()
      except Unsatisfiable:  # nothing to break in an operation without parameters (GET /health)
        assert mode == schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET"
  assert not failures, failures[:5]
  assert all(calls.get(f"POST /v1/{p}", 0) >= 25 for p in ("completions", "chat/completions")), calls
  assert_all_pages_back(sched)
