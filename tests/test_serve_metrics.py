"""GET /metrics: the scrape parses, counters move by what the calls did (errors and 429s counted with their
status), gauges are read from the scheduler when scraped, histograms get one observation per choice, apps keep
separate registries, metric failures never reach a client, and metrics=False is a 404. Scripted schedulers
stand in for the engine (no compile); one unstarted real Scheduler over an engine stub checks the stats keys the gauges read."""
import json
import threading
import time
import types

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from internlm_jax.serve.api import create_app
from internlm_jax.serve.kv_cache import PageAllocator
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.scheduler import Delta, Finished, Scheduler, ServerBusyError, TokenInfo
from internlm_jax.serve.testing import tiny_tokenizer

MODEL = "tiny-internlm2"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
ANSWER = "Sunny in Paris."
CACHED = 2  # prefix-cache hits the scripted scheduler reports per sub-request


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


class Scripted:
  """Answers every sub-request with ANSWER, one Delta per token, from a thread after `delay` seconds (so the
  time to first token is at least that). `busy`: submit raises ServerBusyError (a 429)."""

  def __init__(self, tok, delay=0.0, stats=None):
    self.engine = types.SimpleNamespace(max_seq_len=4096, max_request_tokens=4096)
    self.tok, self.delay, self.busy = tok, delay, False
    self.current = stats or {}

  def stats(self):
    if isinstance(self.current, Exception):
      raise self.current
    return dict(self.current)

  def submit(self, prompt, params, sink):
    if self.busy:
      raise ServerBusyError("the server is busy")
    ids = self.tok.encode(ANSWER)

    def run():
      time.sleep(self.delay)
      for i in range(len(ids)):
        sink(Delta(self.tok.decode(ids[i:i + 1]), [TokenInfo(ids[i])]))
      sink(Finished("stop", ANSWER, ids, len(prompt), CACHED))
    threading.Thread(target=run, daemon=True).start()
    return types.SimpleNamespace(cancel=lambda: None)


def scrape(client) -> dict[str, float]:
  """Every sample as 'name{label="value",...}' -> value (labels sorted)."""
  r = client.get("/metrics")
  assert r.status_code == 200, r.text
  assert r.headers["content-type"].startswith("text/plain")
  out = {}
  for family in text_string_to_metric_families(r.text):
    for s in family.samples:
      labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
      out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
  return out


def delta(after, before, key):
  return after.get(key, 0.0) - before.get(key, 0.0)


def requests_key(endpoint, status):
  return f'internlm_jax_http_requests_total{{endpoint="{endpoint}",status="{status}"}}'


def test_completion_and_streamed_chat_move_the_counters(tok):
  sched = Scripted(tok)
  client = TestClient(create_app(sched, tok, MODEL))
  before = scrape(client)
  prompt = "The quick brown fox"
  r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 20})
  assert r.status_code == 200, r.text
  with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
    assert s.status_code == 200
    lines = [line for line in s.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  after = scrape(client)
  chat_prompt = len(tok.encode_chat(CHAT["messages"]))
  answer = len(tok.encode(ANSWER))
  assert delta(after, before, requests_key("/v1/completions", 200)) == 1
  assert delta(after, before, requests_key("/v1/chat/completions", 200)) == 1
  assert delta(after, before, "internlm_jax_prompt_tokens_total") == len(tok.encode(prompt)) + chat_prompt
  assert delta(after, before, "internlm_jax_generation_tokens_total") == 2 * answer
  assert delta(after, before, "internlm_jax_prefix_cache_hit_tokens_total") == 2 * CACHED
  assert delta(after, before, 'internlm_jax_finished_requests_total{reason="stop"}') == 2
  assert delta(after, before, "internlm_jax_request_generation_tokens_sum") == 2 * answer
  assert delta(after, before, "internlm_jax_request_prompt_tokens_count") == 2
  assert delta(after, before, "internlm_jax_time_per_output_token_seconds_count") == 2  # answers of 2+ tokens
  assert after[requests_key("/metrics", 200)] >= 1  # the first scrape, counted when it answered


def test_n2_observes_each_choice_from_the_http_arrival(tok):
  client = TestClient(create_app(Scripted(tok, delay=0.05), tok, MODEL))
  before = scrape(client)
  r = client.post("/v1/chat/completions", json={**CHAT, "n": 2})
  assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
  after = scrape(client)
  for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
               "request_generation_tokens"):
    assert delta(after, before, f"internlm_jax_{name}_count") == 2, name
  ttft = delta(after, before, "internlm_jax_time_to_first_token_seconds_sum")
  e2e = delta(after, before, "internlm_jax_e2e_request_latency_seconds_sum")
  assert 2 * 0.05 <= ttft <= e2e < 2 * 5.0, (ttft, e2e)
  # Both choices waited > 40 ms: none in the 40 ms bucket, both in 1 s (cumulative buckets).
  assert delta(after, before, 'internlm_jax_time_to_first_token_seconds_bucket{le="0.04"}') == 0
  assert delta(after, before, 'internlm_jax_time_to_first_token_seconds_bucket{le="1.0"}') == 2
  assert delta(after, before, "internlm_jax_request_prompt_tokens_sum") == 2 * len(tok.encode_chat(CHAT["messages"]))


def test_400_and_429_are_counted_with_their_status(tok):
  sched = Scripted(tok)
  client = TestClient(create_app(sched, tok, MODEL))
  before = scrape(client)
  assert client.post("/v1/chat/completions", json={**CHAT, "temperature": -1}).status_code == 400
  assert client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
                     ).status_code == 400
  assert client.post("/v1/chat/completions", json={**CHAT, "model": "other"}).status_code == 404
  assert client.get("/no/such/path").status_code == 404
  assert client.get("/v1/completions").status_code == 405
  assert client.get("/openapi.json").status_code == 200
  sched.busy = True
  r = client.post("/v1/chat/completions", json=CHAT)
  assert r.status_code == 429 and r.json()["error"]["type"] == "server_busy"
  after = scrape(client)
  assert delta(after, before, requests_key("/v1/chat/completions", 400)) == 1
  assert delta(after, before, requests_key("/v1/completions", 400)) == 1
  assert delta(after, before, requests_key("/v1/chat/completions", 404)) == 1
  assert delta(after, before, requests_key("unmatched", 404)) == 1  # unknown paths share one label
  assert delta(after, before, requests_key("/v1/completions", 405)) == 1
  assert delta(after, before, requests_key("/openapi.json", 200)) == 1
  assert delta(after, before, requests_key("/v1/chat/completions", 429)) == 1
  assert delta(after, before, "internlm_jax_prompt_tokens_total") == 0


def test_gauges_are_the_schedulers_stats_at_scrape_time(tok):
  stats = {"running": 3, "queued": 5, "free_slots": 1, "pages_available": 30, "pages_total": 40,
           "pages_cached": 7, "preemptions": 2, "finished_stop": 9}
  sched = Scripted(tok, stats=stats)
  client = TestClient(create_app(sched, tok, MODEL))
  got = scrape(client)
  want = {"requests_running": 3, "requests_queued": 5, "free_slots": 1, "kv_pages_total": 40, "kv_pages_cached": 7,
          "kv_pages_used": 10, "kv_cache_usage_ratio": 0.25, "preemptions_total": 2}
  assert {k: got["internlm_jax_" + k] for k in want} == want
  sched.current = {**stats, "running": 0, "queued": 0, "pages_available": 40, "preemptions": 4}
  got = scrape(client)
  assert got["internlm_jax_requests_running"] == 0 and got["internlm_jax_kv_cache_usage_ratio"] == 0
  assert got["internlm_jax_preemptions_total"] == 4
  sched.current = RuntimeError("stats broke")  # the scrape still answers, without the scheduler's part
  got = scrape(client)
  assert "internlm_jax_requests_running" not in got and "internlm_jax_prompt_tokens_total" in got


def test_gauges_read_a_real_schedulers_stats(tok):
  # The real Scheduler and PageAllocator over an engine stub: the stats keys the gauges read, without JAX.
  alloc = PageAllocator(num_pages=9, page_size=8, max_slots=2, pages_per_seq=4)
  engine = types.SimpleNamespace(ec=types.SimpleNamespace(max_slots=2), config=types.SimpleNamespace(vocab_size=1024),
                                 allocator=alloc, init_state=lambda: None, check_request=lambda *a: None,
                                 max_seq_len=32, max_request_tokens=32)
  sched = Scheduler(engine, tok, max_queue=4)  # never started: what is submitted stays queued
  sched.submit(tok.encode("hi"), SamplingParams(max_tokens=2))
  alloc.allocate(2)
  got = scrape(TestClient(create_app(sched, tok, MODEL)))
  assert got["internlm_jax_requests_queued"] == 1 and got["internlm_jax_requests_running"] == 0
  assert got["internlm_jax_free_slots"] == 2 and got["internlm_jax_kv_pages_total"] == 8
  assert got["internlm_jax_kv_pages_used"] == 2 and got["internlm_jax_kv_cache_usage_ratio"] == 0.25
  assert got["internlm_jax_kv_pages_cached"] == 0 and got["internlm_jax_preemptions_total"] == 0


def test_apps_have_independent_registries(tok):
  one, two = TestClient(create_app(Scripted(tok), tok, MODEL)), TestClient(create_app(Scripted(tok), tok, MODEL))
  before = scrape(two)
  assert one.post("/v1/chat/completions", json=CHAT).status_code == 200
  after = scrape(two)
  assert delta(after, before, requests_key("/v1/chat/completions", 200)) == 0
  assert delta(after, before, "internlm_jax_generation_tokens_total") == 0
  assert scrape(one)[requests_key("/v1/chat/completions", 200)] == 1


def test_metric_failures_never_reach_the_client(tok):
  app = create_app(Scripted(tok), tok, MODEL)
  client = TestClient(app)

  class Broken:
    def __getattr__(self, name):
      raise RuntimeError("metrics broke")

  m = app.state.metrics
  m.http_requests = m.ttft = m.e2e = m.generation_tokens = m.prompt_tokens = Broken()
  r = client.post("/v1/chat/completions", json=CHAT)
  assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER
  with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
    assert s.status_code == 200 and [line for line in s.iter_lines() if line][-1] == "data: [DONE]"
  assert client.get("/metrics").status_code == 200


def test_openmetrics_when_asked_and_404_when_disabled(tok):
  client = TestClient(create_app(Scripted(tok), tok, MODEL))
  r = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
  assert r.status_code == 200 and r.headers["content-type"].startswith("application/openmetrics-text")
  assert r.text.rstrip().endswith("# EOF")
  assert client.get("/metrics", headers={"accept": "garbage;;;=="}).status_code == 200
  off = TestClient(create_app(Scripted(tok), tok, MODEL, metrics=False))
  r = off.get("/metrics")
  assert r.status_code == 404 and json.loads(r.text)["error"]["type"] == "not_found_error"
  assert off.post("/v1/chat/completions", json=CHAT).status_code == 200
  assert "/metrics" not in off.get("/openapi.json").json()["paths"]


def test_time_per_output_token_counts_only_tokens_after_the_first_delivery():
  # A Delta carries a whole device call's tokens: the per-token time is the time after the first delivery over
  # the tokens that came after it (a choice delivered in one Delta has none to time).
  from internlm_jax.serve.metrics import RequestTracker, ServerMetrics
  metrics = ServerMetrics(types.SimpleNamespace(stats=lambda: {}))
  tracker = RequestTracker(metrics, arrival=time.perf_counter())
  four = [TokenInfo(t) for t in (5, 6, 7, 8)]
  tracker(0, Delta("abcd", four))
  tracker(0, Finished("length", "abcd", [5, 6, 7, 8], 3, 0))
  tracker(1, Delta("abcd", four))
  time.sleep(0.04)
  tracker(1, Delta("efgh", four))
  tracker(1, Finished("length", "abcdefgh", [5, 6, 7, 8] * 2, 3, 0))
  count = metrics.registry.get_sample_value("internlm_jax_time_per_output_token_seconds_count")
  total = metrics.registry.get_sample_value("internlm_jax_time_per_output_token_seconds_sum")
  assert count == 1 and 0.01 <= total < 0.5, (count, total)  # 0.04 s over 4 tokens (over 7 would be < 0.01)
