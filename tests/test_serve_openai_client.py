"""The official `openai` Python client against our server over real HTTP (uvicorn on 127.0.0.1, a free port):
models, completions (logprobs, echo scoring, streaming), chat (streaming with usage, seeds), tool calls, and
errors mapped to the client's exception classes.

A tiny random model sits behind a real scheduler. It cannot write valid tool-call JSON, so the tool-call round
trip runs against a scripted scheduler that answers with a fixed plugin call; forced tool_choice still goes
through the real model to show the path never fails.
"""
import json
import types

import openai
import pytest

from internlm_jax.serve.api import create_app
from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.scheduler import Delta, Finished, ServerBusyError, Scheduler, TokenInfo
from internlm_jax.serve.testing import loopback_server, tiny_model, tiny_tokenizer

MODEL = "tiny-internlm2"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|>'


def make_client(base: str) -> openai.OpenAI:
  # No retries: a 429 or 5xx must surface as the client's exception, not be retried away.
  return openai.OpenAI(api_key="not-checked", base_url=base + "/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def live(tok):
  config, params = tiny_model()
  ec = EngineConfig(max_slots=2, max_seq_len=256, page_size=8, prefill_chunk=256, steps_per_call=4,
                    sample_vocab=tok.vocab_size)
  sched = Scheduler(Engine(params, config, ec), tok, max_queue=8).start()
  try:
    with loopback_server(create_app(sched, tok, MODEL)) as base:
      client = make_client(base)
      yield client, sched
      client.close()
  finally:
    sched.stop()


class ScriptedScheduler:
  """Stands in for the Scheduler: answers every request with `text` (one Delta per token of the real tokenizer,
  so streaming sees the action arrive piecewise), or raises ServerBusyError when `busy`. Records prompts."""

  def __init__(self, tok, text: str = "", busy: bool = False):
    self.engine = types.SimpleNamespace(max_seq_len=4096, max_request_tokens=4096)
    self.tok, self.text, self.busy, self.prompts = tok, text, busy, []

  def stats(self):
    return {}

  def submit(self, prompt, params, sink):
    if self.busy:
      raise ServerBusyError("the server is busy; retry later")
    self.prompts.append(self.tok.decode(prompt))
    ids = self.tok.encode(self.text)
    shown = ""
    for i in range(len(ids)):  # the text each token releases, as TextStream would
      piece = self.tok.decode(ids[:i + 1])[len(shown):]
      shown += piece
      sink(Delta(piece, [TokenInfo(ids[i])]))
    sink(Finished("stop", self.text, ids, len(prompt), 0))
    return types.SimpleNamespace(cancel=lambda: None)


def test_models_and_completions(live):
  client, sched = live
  assert [m.id for m in client.models.list().data] == [MODEL]
  common = dict(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0,
                extra_body={"ignore_eos": True})
  done = client.completions.create(logprobs=2, **common)
  choice = done.choices[0]
  assert choice.finish_reason == "length" and done.usage.completion_tokens == 5
  assert len(choice.logprobs.tokens) == 5 and "".join(choice.logprobs.tokens) == choice.text
  assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
  assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
  # Streaming greedy output is the same text, in pieces, ending with the finish reason.
  chunks = list(client.completions.create(stream=True, **common))
  assert "".join(c.choices[0].text for c in chunks) == choice.text
  assert chunks[-1].choices[0].finish_reason == "length"
  # echo + logprobs with max_tokens=0 scores the prompt (lm-eval's local-completions).
  scored = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=0, echo=True,
                                     logprobs=0)
  lp = scored.choices[0].logprobs
  assert scored.choices[0].text == "The quick brown fox"
  assert lp.token_logprobs[0] is None and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])


def test_chat_streaming_and_seed(live):
  client, sched = live
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather?"}]
  done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=3)
  message = done.choices[0].message
  assert message.role == "assistant" and done.choices[0].finish_reason in ("stop", "length")
  assert all(len(t.top_logprobs) == 3 for t in done.choices[0].logprobs.content)
  stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                          stream=True, stream_options={"include_usage": True})
  chunks = list(stream)
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == (message.content or "")
  assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
  # A seeded sampled request repeats; max_completion_tokens is honoured.
  seeded = dict(model=MODEL, messages=messages, temperature=1.0, seed=11, max_completion_tokens=8,
                extra_body={"ignore_eos": True})
  first = client.chat.completions.create(**seeded)
  assert first.usage.completion_tokens == 8
  assert client.chat.completions.create(**seeded).choices[0].message.content == first.choices[0].message.content


def test_n_choices(live):
  client, sched = live
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather?"}]
  common = dict(model=MODEL, messages=messages, n=2, max_tokens=4, temperature=1.0, seed=5,
                extra_body={"ignore_eos": True})
  done = client.chat.completions.create(**common)
  assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens == 8
  texts = [c.message.content for c in done.choices]
  assert texts[0] != texts[1]  # each choice samples with a seed of its own
  got = ["", ""]
  for chunk in client.chat.completions.create(stream=True, **common):
    for choice in chunk.choices:
      got[choice.index] += choice.delta.content or ""
  assert got == texts
  batch = client.completions.create(model=MODEL, prompt=["The quick", "Numbers 0 1"], n=2, max_tokens=2,
                                    temperature=0, echo=True)
  assert [c.index for c in batch.choices] == [0, 1, 2, 3]
  assert [c.text.split(" ")[0] for c in batch.choices] == ["The", "The", "Numbers", "Numbers"]
  sched.wait_idle(timeout=30)
  assert sched.engine.allocator.num_available == sched.engine.allocator.usable_pages

def test_forced_tool_choice_on_the_real_model_never_fails(live):
  client, sched = live
  messages = [{"role": "user", "content": "Weather in Paris?"}]
  for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required", "auto", "none"):
    done = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=choice,
                                          max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length", "tool_calls"), choice
  alloc = sched.engine.allocator
  sched.wait_idle(timeout=30)
  assert alloc.num_available == alloc.usable_pages


def test_tool_call_round_trip(tok):
  scripted = ScriptedScheduler(tok, "Let me check." + CALL)
  with loopback_server(create_app(scripted, tok, MODEL)) as base:
    client = make_client(base)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    done = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert '"get_weather"' in scripted.prompts[0]  # the tool schema reached the plugin system prompt
    # The SDK's message object goes back as is (with its None fields), then the tool's result.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    scripted.text = "It is 21 degrees."
    done = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert done.choices[0].message.content == "It is 21 degrees." and not done.choices[0].message.tool_calls
    assert CALL in scripted.prompts[1] and '{"temp": 21}' in scripted.prompts[1]
    # Streaming: content before the action, then the call as tool_calls deltas, accumulated by the SDK helper.
    scripted.text = "Let me check." + CALL
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages[:1], tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [t.function.name for t in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(model=MODEL, messages=messages[:1], tools=TOOLS) as s:
      final = s.get_final_completion().choices[0].message
    assert json.loads(final.tool_calls[0].function.arguments) == {"city": "Paris"}
    client.close()


def test_errors_map_to_client_exceptions(live, tok):
  client, sched = live
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="gpt-4", prompt="hi")
  assert "does not exist" in e.value.message
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10 ** 6)
  assert e.value.code == "context_length_exceeded"
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=MODEL, prompt="hi", extra_body={"bogus_field": 1})
  assert "bogus_field" in e.value.message
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=MODEL, prompt="hi", frequency_penalty=2.5)  # OpenAI's range is [-2, 2]
  assert e.value.param == "frequency_penalty"
  busy = ScriptedScheduler(tok, busy=True)
  with loopback_server(create_app(busy, tok, MODEL)) as base:
    with make_client(base) as other, pytest.raises(openai.RateLimitError) as e:
      other.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
  assert e.value.code == "server_busy"
  # The live server is unharmed by all of the above.
  assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason


def test_structured_output_parses_with_the_clients_pydantic_helper(live):
  """`client.chat.completions.parse(response_format=Model)`: the client sends the model's strict JSON schema and
  parses the reply into the model; guided decoding makes the random tiny model's reply fit."""
  import enum

  import pydantic

  class Color(str, enum.Enum):
    red = "red"
    green = "green"

  class Answer(pydantic.BaseModel):
    color: Color
    sure: bool

  client, _ = live
  done = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Pick a color."}],
                                       response_format=Answer, max_tokens=40, temperature=0.7, seed=1)
  answer = done.choices[0].message.parsed
  assert isinstance(answer, Answer) and done.choices[0].finish_reason == "stop"
