"""n > 1 choices (and completions' best_of) over the OpenAI API: choice indices (prompt-major for prompt lists),
per-choice seeds, one finish_reason per choice in streams, usage that counts each prompt once, admission all or
none, and cancellation of every sub-request on disconnect or on an error in one. A tiny random model behind a
real scheduler; tool calls and failures through scripted schedulers."""
import json
import time
import types

import httpx
import pytest
from fastapi.testclient import TestClient

from internlm_jax.serve.api import create_app
from internlm_jax.serve.engine import Engine
from internlm_jax.serve.fanout import choice_seed
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.scheduler import Delta, Finished, Scheduler, TokenInfo
from internlm_jax.serve.testing import loopback_server, tiny_api

MODEL = "tiny-internlm2"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
SAMPLED = {"max_tokens": 5, "temperature": 1.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  with tiny_api(tmp_path_factory.mktemp("tok"), MODEL) as fixtures:
    yield fixtures


def post(client, path, body):
  r = client.post(path, json=body)
  return r.status_code, r.json()


def stream(client, path, body):
  with client.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
    assert r.status_code == 200, r.read()
    lines = [line for line in r.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  return [json.loads(line[6:]) for line in lines[:-1]]


def counts(usage):  # cached_tokens depends on what earlier calls left in the prefix cache
  return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def assert_pages_back(sched):
  sched.wait_idle(timeout=30)
  alloc = sched.engine.allocator
  alloc.check_invariants()
  assert alloc.num_available == alloc.usable_pages, sched.stats()


def test_choice_seeds_differ_in_the_engines_32_bits():
  assert choice_seed(5, 0) == 5
  for seed in (0, 5, 2 ** 32 - 1, 2 ** 63 - 1):
    seeds = [choice_seed(seed, j) for j in range(16)]
    assert all(0 <= s < 2 ** 63 for s in seeds) and len({s % 2 ** 32 for s in seeds}) == 16
  assert choice_seed(5, 1) != choice_seed(6, 0)  # neighbouring seeds do not share samples


def test_completions_n_seeded_reproducible_distinct_and_streamed(setup):
  client, sched, tok, _ = setup
  req = {"model": MODEL, "prompt": "Numbers 0 1 2", "n": 3, "seed": 7, **SAMPLED}
  status, body = post(client, "/v1/completions", req)
  assert status == 200, body
  texts = [c["text"] for c in body["choices"]]
  assert [c["index"] for c in body["choices"]] == [0, 1, 2] and len(set(texts)) == 3, texts
  assert all(c["finish_reason"] == "length" for c in body["choices"])
  assert body["usage"]["prompt_tokens"] == len(tok.encode("Numbers 0 1 2"))  # the prompt counts once
  assert body["usage"]["completion_tokens"] == 15
  assert [c["text"] for c in post(client, "/v1/completions", req)[1]["choices"]] == texts
  # Choice 0 keeps the request's seed: it is the n=1 answer.
  assert post(client, "/v1/completions", {**req, "n": 1})[1]["choices"][0]["text"] == texts[0]
  chunks = stream(client, "/v1/completions", req)
  got, reasons = ["", "", ""], [[], [], []]
  for c in chunks[:-1]:
    (choice,) = c["choices"]
    got[choice["index"]] += choice["text"]
    if choice["finish_reason"]:
      reasons[choice["index"]].append(choice["finish_reason"])
  assert got == texts and reasons == [["length"]] * 3
  assert chunks[-1]["choices"] == [] and counts(chunks[-1]["usage"]) == counts(body["usage"])
  assert_pages_back(sched)


def test_prompt_list_times_n_is_prompt_major(setup):
  client, *_ = setup
  req = {"model": MODEL, "prompt": ["The quick", "Numbers 0 1"], "n": 2, "max_tokens": 2, "temperature": 0,
         "ignore_eos": True, "echo": True}
  status, body = post(client, "/v1/completions", req)
  assert status == 200, body
  choices = body["choices"]
  assert [c["index"] for c in choices] == [0, 1, 2, 3]
  assert [c["text"].startswith(p) for c, p in zip(choices, ["The quick"] * 2 + ["Numbers 0 1"] * 2)] == [True] * 4
  assert choices[0]["text"] == choices[1]["text"] and choices[2]["text"] == choices[3]["text"]  # greedy
  single = post(client, "/v1/completions", {**req, "n": 1})[1]
  assert body["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
  assert body["usage"]["completion_tokens"] == 2 * single["usage"]["completion_tokens"] == 8
  chunks = stream(client, "/v1/completions", req)
  echoed = [c["choices"][0]["text"] for c in chunks[:4]]  # the echoed prompts come first, in choice order
  assert echoed == ["The quick"] * 2 + ["Numbers 0 1"] * 2


def test_chat_n_non_streaming_and_streaming(setup):
  client, sched, _, _ = setup
  req = {**CHAT, "n": 3, "seed": 11, **SAMPLED}
  status, body = post(client, "/v1/chat/completions", req)
  assert status == 200, body
  contents = [c["message"]["content"] for c in body["choices"]]
  assert [c["index"] for c in body["choices"]] == [0, 1, 2] and len(set(contents)) == 3, contents
  assert all(c["message"]["role"] == "assistant" and c["finish_reason"] == "length" for c in body["choices"])
  assert body["usage"]["completion_tokens"] == 15
  assert body["usage"]["prompt_tokens"] == post(client, "/v1/chat/completions", {**req, "n": 1})[1]["usage"][
      "prompt_tokens"]
  chunks = stream(client, "/v1/chat/completions", req)
  roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
  assert roles == [0, 1, 2] and all(c["choices"][0]["delta"].get("role") for c in chunks[:3])
  got, reasons = ["", "", ""], [0, 0, 0]
  for c in chunks[:-1]:
    (choice,) = c["choices"]
    got[choice["index"]] += choice["delta"].get("content", "")
    reasons[choice["index"]] += choice["finish_reason"] is not None
  assert got == contents and reasons == [1, 1, 1]
  assert chunks[-1]["choices"] == [] and counts(chunks[-1]["usage"]) == counts(body["usage"])
  assert_pages_back(sched)


def test_best_of_returns_the_best_candidates(setup):
  client, *_ = setup
  req = {"model": MODEL, "prompt": "The quick", "seed": 3, **SAMPLED}
  # The same seed gives the same candidates as n=best_of: rank them by mean logprob per token.
  every = post(client, "/v1/completions", {**req, "n": 3, "logprobs": 0})[1]["choices"]
  mean = {c["text"]: sum(c["logprobs"]["token_logprobs"]) / 5 for c in every}
  status, body = post(client, "/v1/completions", {**req, "n": 2, "best_of": 3})
  assert status == 200, body
  assert [c["text"] for c in body["choices"]] == sorted(mean, key=mean.get, reverse=True)[:2]
  assert [c["index"] for c in body["choices"]] == [0, 1] and body["choices"][0]["logprobs"] is None
  assert body["usage"]["completion_tokens"] == 15  # every candidate is generated


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n", "n must be at most 16"),
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n", "n must be at most 16"),
    ("/v1/chat/completions", {**CHAT, "n": 5}, "n", "at most 4"),  # past max_queue: a 429 would never clear
    ("/v1/completions", {"prompt": ["a", "b"], "n": 3}, "n", "2 prompts x n=3"),
    ("/v1/completions", {"prompt": "a", "n": 3, "best_of": 2}, "best_of", "best_of must be in [n, 16]"),
    ("/v1/completions", {"prompt": "a", "best_of": 5}, "best_of", "best_of=5"),
    ("/v1/completions", {"prompt": "a", "best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
])
def test_too_many_choices_are_400_naming_the_parameter(setup, path, body, param, needle):
  client, *_ = setup
  status, payload = post(client, path, {"model": MODEL, **body})
  assert status == 400 and payload["error"]["param"] == param and needle in payload["error"]["message"], payload


def test_n_is_admitted_all_or_none(setup):
  client, sched, tok, (config, params) = setup
  # A scheduler that is never started keeps what it queued: 2 held, then n=3 fits only part way.
  stalled = Scheduler(Engine(params, config, sched.engine.ec), tok, max_queue=4)
  held = [stalled.submit(tok.encode("hi"), SamplingParams(max_tokens=2)) for _ in range(2)]
  status, body = post(TestClient(create_app(stalled, tok, MODEL)), "/v1/chat/completions", {**CHAT, "n": 3})
  assert status == 429 and body["error"]["type"] == "server_busy", body
  assert stalled.stats()["queued"] == 2 and stalled.finished["cancelled"] == 2  # the two that got in left again
  for h in held:
    h.cancel()


def test_disconnected_n_stream_cancels_every_choice_and_returns_pages(setup):
  _, sched, tok, _ = setup
  before = sched.finished["cancelled"]
  body = {"model": MODEL, "prompt": "The quick", "n": 3, "max_tokens": 150, "temperature": 0, "ignore_eos": True,
          "stream": True}
  with loopback_server(create_app(sched, tok, MODEL)) as base:
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
      assert r.status_code == 200
      next(r.iter_lines())
    assert_pages_back(sched)
  assert sched.finished["cancelled"] == before + 3


def test_stream_closed_before_its_events_cancels_the_batch():
  # A chat stream sends each choice's role chunk before it reads any event, so a client that leaves then closes
  # the generator at one of those yields, where Batch.events' cleanup never ran: guard must cancel the batch.
  import asyncio
  from internlm_jax.serve.fanout import guard

  class FakeBatch:
    cancelled = 0

    def cancel(self):
      self.cancelled += 1

  async def roles_then_events():
    for k in range(3):
      yield f"role {k}"
    raise AssertionError("never reached")

  async def client_leaves_after_one_chunk(batch):
    stream = guard(roles_then_events(), batch)
    assert await stream.__anext__() == "role 0"
    await stream.aclose()

  batch = FakeBatch()
  asyncio.run(client_leaves_after_one_chunk(batch))
  assert batch.cancelled == 1


class Scripted:
  """Answers sub-request number i (from 0) with texts[i % len(texts)]; None never answers; "ERROR" fails it.
  Records which sub-requests were cancelled."""

  def __init__(self, tok, texts):
    self.engine = types.SimpleNamespace(max_seq_len=4096, max_request_tokens=4096)
    self.tok, self.texts, self.submitted, self.cancelled, self.seeds = tok, texts, 0, [], []

  def stats(self):
    return {}

  def submit(self, prompt, params, sink):
    number, self.submitted = self.submitted, self.submitted + 1
    self.seeds.append(params.seed)
    text = self.texts[number % len(self.texts)]
    if text == "ERROR":
      sink(Finished("error", "", [], len(prompt), 0, error="boom"))
    elif text is not None:
      ids = self.tok.encode(text)
      for i in range(len(ids)):
        sink(Delta(self.tok.decode(ids[i:i + 1]), [TokenInfo(ids[i])]))
      sink(Finished("stop", text, ids, len(prompt), 0))
    return types.SimpleNamespace(cancel=lambda: self.cancelled.append(number))


def test_tool_calls_per_choice(setup):
  _, _, tok, _ = setup
  call = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|>'
  client = TestClient(create_app(Scripted(tok, ["Let me check." + call, "Sunny."]), tok, MODEL))
  tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
  req = {**CHAT, "tools": tools, "n": 2}
  status, body = post(client, "/v1/chat/completions", req)
  assert status == 200, body
  first, second = body["choices"]
  assert first["finish_reason"] == "tool_calls" and first["message"]["content"] == "Let me check."
  assert first["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
  assert second["finish_reason"] == "stop" and second["message"]["content"] == "Sunny."
  assert "tool_calls" not in second["message"]
  chunks = stream(client, "/v1/chat/completions", req)
  content, calls, reasons = ["", ""], [[], []], [[], []]
  for c in chunks[:-1]:
    (choice,) = c["choices"]
    k = choice["index"]
    content[k] += choice["delta"].get("content", "")
    calls[k] += choice["delta"].get("tool_calls", [])
    reasons[k] += [choice["finish_reason"]] if choice["finish_reason"] else []
  assert content == ["Let me check.", "Sunny."] and reasons == [["tool_calls"], ["stop"]]
  assert [t["function"]["name"] for t in calls[0]] == ["get_weather"] and calls[1] == []


def test_an_error_in_one_choice_cancels_the_others(setup):
  _, _, tok, _ = setup
  scripted = Scripted(tok, [None, "ERROR", None])
  client = TestClient(create_app(scripted, tok, MODEL), raise_server_exceptions=False)
  status, body = post(client, "/v1/chat/completions", {**CHAT, "n": 3, "seed": 1})
  assert status == 500 and "boom" in body["error"]["message"], body
  assert sorted(scripted.cancelled) == [0, 2]
  assert scripted.seeds == [choice_seed(1, j) for j in range(3)]
  scripted = Scripted(tok, [None, "ERROR"])  # streaming: the error is the stream's last event
  chunks = stream(TestClient(create_app(scripted, tok, MODEL)), "/v1/completions",
                  {"model": MODEL, "prompt": "hi", "n": 2})
  assert "boom" in chunks[-1]["error"]["message"]
  deadline = time.monotonic() + 5
  while scripted.cancelled != [0] and time.monotonic() < deadline:
    time.sleep(0.01)
  assert scripted.cancelled == [0]
