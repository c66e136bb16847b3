"""Guided decoding (response_format, forced tool calls): the device mask against numpy, the host grammar against
the tokens it allows, and the server's outputs parsed and checked against the schema they were asked to fit."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.serve import guided, sampling
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.testing import tiny_api

MODEL = "tiny-internlm2"
COLOR_SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
                "required": ["color", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  with tiny_api(tmp_path_factory.mktemp("tok"), MODEL, max_seq_len=320) as fixtures:  # room for two tools
    yield fixtures


def _chat(client, **body):
  body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, **body}
  return client.post("/v1/chat/completions", json=body)


def _allowed(mask: np.ndarray, vocab: int) -> np.ndarray:
  return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab])


def test_token_mask_keeps_exactly_the_allowed_ids():
  rng = np.random.default_rng(0)
  B, V = 3, 70  # V not a multiple of 32: the last word's high bits lie past the vocabulary
  allowed = rng.integers(0, 2 ** 32, size=(B, 3), dtype=np.uint64).astype(np.uint32)
  logits = jnp.asarray(rng.normal(size=(B, V)), jnp.float32)
  guided_rows = np.array([True, False, True])
  got = np.asarray(jax.jit(sampling.apply_token_mask)(logits, jnp.asarray(allowed), jnp.asarray(guided_rows)))
  bits = np.unpackbits(allowed.view(np.uint8), axis=1, bitorder="little")[:, :V].astype(bool)
  want = np.where(guided_rows[:, None] & ~bits, -np.inf, np.asarray(logits))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[1], np.asarray(logits)[1])  # an unguided row: bitwise its own logits


def test_guide_allows_only_grammar_continuations(setup):
  _, sched, tok, _ = setup
  V = sched.engine.config.vocab_size
  grammar = guided.compile_response_format({"type": "regex_schema", "regex_schema": "(yes|no)"}, tok, V)
  guide = grammar.guide()
  first = _allowed(guide.mask(), V)
  assert len(first) and all(t < tok.vocab_size for t in first)  # never the padded tail of the model vocabulary
  assert all("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t])) for t in first)
  for t in tok.encode("yes"):
    assert guide.consume(t)
  assert guide.done and guide.error is None
  bad = grammar.guide()
  assert not bad.consume(tok.encode("maybe")[0]) and bad.error  # a token outside the grammar: an error state


def test_json_schema_output_parses_and_fits(setup):
  client = setup[0]
  rf = {"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR_SCHEMA, "strict": True}}
  for temperature in (0.0, 1.0):
    r = _chat(client, response_format=rf, temperature=temperature, seed=3, n=2)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
      value = json.loads(choice["message"]["content"])
      assert value["color"] in ("red", "green", "blue") and isinstance(value["ok"], bool) and len(value) == 2
      assert choice["finish_reason"] == "stop"  # complete grammar: finished without waiting for a stop token


def test_regex_on_completions_with_choices_and_stream(setup):
  client = setup[0]
  body = {"model": MODEL, "prompt": "The", "max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 1,
          "response_format": {"type": "regex_schema", "regex_schema": "[0-9]{3}-[a-z]{2}"}}
  r = client.post("/v1/completions", json=body)
  assert r.status_code == 200, r.text
  for choice in r.json()["choices"]:
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", choice["text"]), choice
  with client.stream("POST", "/v1/completions", json={**body, "n": 1, "stream": True}) as s:
    lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
  text = "".join(c["choices"][0]["text"] for c in lines if c["choices"])
  assert re.fullmatch("[0-9]{3}-[a-z]{2}", text)


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call_fits_its_schema(setup, tool_choice):
  client = setup[0]
  params = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"enum": [1, 2]}},
            "required": ["city", "days"], "additionalProperties": False}
  tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}},
           {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                               "additionalProperties": False}}}]
  r = _chat(client, tools=tools, tool_choice=tool_choice, temperature=1.0, seed=0, max_tokens=60,
            messages=[{"role": "user", "content": "weather?"}])
  assert r.status_code == 200, r.text
  choice = r.json()["choices"][0]
  assert choice["finish_reason"] == "tool_calls", choice
  (call,) = choice["message"]["tool_calls"]
  args = json.loads(call["function"]["arguments"])
  if call["function"]["name"] == "get_weather":
    assert args["city"] in ("Paris", "Rome") and args["days"] in (1, 2)
  else:
    assert tool_choice == "required" and args == {}


def test_unguided_neighbours_keep_their_tokens(setup):
  _, sched, tok, _ = setup
  prompt = tok.encode("The quick brown fox")
  plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
  alone = sched.generate(prompt, plain, timeout=60).token_ids
  grammar = guided.compile_response_format({"type": "regex_schema", "regex_schema": "[a-z ]{1,30}"}, tok,
                                           sched.engine.config.vocab_size)
  guided_handle = sched.submit(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=0, grammar=grammar))
  beside = sched.submit(prompt, plain)
  assert beside.result(60).token_ids == alone
  assert re.fullmatch("[a-z ]{1,30}", guided_handle.result(60).text)


@pytest.mark.parametrize("body, needle", [
    ({"response_format": {"type": "regex_schema", "regex_schema": "(a"}}, "unclosed group"),
    ({"response_format": {"type": "xml"}}, "'xml' is not supported"),
    ({"response_format": {"type": "json_schema"}}, "json_schema must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, "nope"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}}, "matches no text"),
    ({"response_format": {"type": "regex_schema", "regex_schema": "[^\\x00-\\x{10FFFF}]"}}, "matches no text"),
    ({"response_format": {"type": "regex_schema", "regex_schema": "a{1000000}"}}, "guided decoding"),
    ({"response_format": {"type": "json_object"}, "tool_choice": "required",
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "cannot be combined"),
])
def test_bad_response_formats_are_400(setup, body, needle):
  r = _chat(setup[0], **body)
  assert r.status_code == 400, r.text
  error = r.json()["error"]
  assert needle in error["message"] and error["param"].startswith("response_format")
  assert "Traceback" not in error["message"]


def test_text_format_is_plain_decoding(setup):
  client = setup[0]
  a = _chat(client, temperature=0.0, max_tokens=8)
  b = _chat(client, temperature=0.0, max_tokens=8, response_format={"type": "text"})
  assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]


def test_strict_decides_unsupported_keywords(setup):
  schema = {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True, "maxItems": 2}
  lax = _chat(setup[0], response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
              temperature=0.0)
  assert lax.status_code == 200, lax.text
  assert set(json.loads(lax.json()["choices"][0]["message"]["content"])) <= {"a", "b"}
  strict = _chat(setup[0], response_format={"type": "json_schema",
                                            "json_schema": {"name": "s", "schema": schema, "strict": True}})
  assert strict.status_code == 400 and "uniqueItems" in strict.json()["error"]["message"]


def test_grammar_end_token_ends_even_with_ignore_eos(setup):
  _, sched, tok, _ = setup
  grammar = guided.compile_response_format({"type": "regex_schema", "regex_schema": "(ab|abab)"}, tok,
                                           sched.engine.config.vocab_size)
  for seed in range(4):
    done = sched.generate(tok.encode("The"), SamplingParams(max_tokens=12, temperature=1.0, seed=seed,
                                                             ignore_eos=True, grammar=grammar), timeout=60)
    assert done.text in ("ab", "abab") and not set(done.token_ids) & set(tok.stop_token_ids), done


def test_schema_true_is_any_json(setup):
  r = _chat(setup[0], response_format={"type": "json_schema", "json_schema": {"name": "any", "schema": True}},
            temperature=0.0, max_tokens=30)
  assert r.status_code == 200, r.text
