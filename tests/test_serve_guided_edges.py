"""Guided decoding at the edges: preemption, a freed slot's mask, streams, choices, stop / length / logprobs, and
the bytes the grammar sees against the text the server decodes (spaces, accents, escapes)."""
import json
import re

import numpy as np
import pytest

from internlm_jax.serve import guided
from internlm_jax.serve.sampling import SamplingParams, TextStream
from internlm_jax.serve.scheduler import Delta
from internlm_jax.serve.testing import tiny_api

# Edge cases of guided decoding (preemption, cancellation, streaming, choices, bytes): the CI's slow stage runs
# them; the fast suite keeps test_serve_guided.py.
pytestmark = pytest.mark.slow

MODEL = "tiny-internlm2"
DRINKS = ["café au lait", " thé vert ", 'a "b" \\ c']  # spaces (leading too), accents, JSON escapes
SCHEMA = {"type": "object", "properties": {"drink": {"enum": DRINKS}, "note": {"type": "string", "maxLength": 12}},
          "required": ["drink", "note"], "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "d", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  with tiny_api(tmp_path_factory.mktemp("tok"), MODEL, max_seq_len=320) as fixtures:
    # Compiles here (page-table widths up to 16 pages), not in the first test's time.
    warm = {"type": "regex_schema", "regex_schema": "[0-9]{56}"}  # one token per digit: 19 + 56 tokens
    assert _chat(fixtures[0], response_format=warm, max_tokens=60).status_code == 200
    yield fixtures


def _grammar(setup, rf):
  _, sched, tok, _ = setup
  return guided.compile_response_format(rf, tok, sched.engine.config.vocab_size)


def _fits(text):
  value = json.loads(text)
  assert value["drink"] in DRINKS and isinstance(value["note"], str) and len(value["note"]) <= 12, value
  return value


def _chat(client, **body):
  body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "temperature": 1.0,
          "response_format": RF, **body}
  return client.post("/v1/chat/completions", json=body)


def test_preempted_guided_request_keeps_its_grammar_state(setup):
  _, sched, tok, _ = setup
  grammar = _grammar(setup, {"type": "regex_schema", "regex_schema": "[a-c]{22}"})
  guided_params = SamplingParams(max_tokens=26, temperature=1.0, seed=4, grammar=grammar)
  plain_params = SamplingParams(max_tokens=26, temperature=0.0, ignore_eos=True)
  prompts = [tok.encode_chat([{"role": "user", "content": text}]) for text in ("hi", "fox")]  # 19-20 tokens
  alone = sched.generate(prompts[1], guided_params, timeout=60)
  preempted = []
  real_preempt = sched._preempt
  sched.wait_idle()
  # A short pool: 9 free pages of 8 tokens for two sequences that each grow to 6; the newer (guided) is preempted.
  alloc = sched.engine.allocator
  alloc.clear_prefix_cache()
  held = alloc.allocate(alloc.num_available - 9)
  sched._preempt = lambda r: preempted.append((r.params.grammar is not None, len(r.output))) or real_preempt(r)
  try:
    plain = sched.submit(prompts[0], plain_params)
    out = sched.submit(prompts[1], guided_params).result(60)
    plain.result(60)
    sched.wait_idle()
  finally:
    sched._preempt = real_preempt
    alloc.release(held)
  assert any(g and n > 0 for g, n in preempted), preempted  # preempted part way through its grammar
  assert out.reason == "stop" and re.fullmatch("[a-c]{22}", out.text), out
  assert out.token_ids == alone.token_ids
  alloc.check_invariants()


def test_a_guided_slot_leaves_no_mask_behind(setup):
  _, sched, tok, _ = setup
  prompt = tok.encode_chat([{"role": "user", "content": "hi"}])  # the chat tests' lengths: no new compile
  plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
  fresh = sched.generate(prompt, plain, timeout=60).token_ids
  grammar = _grammar(setup, {"type": "regex_schema", "regex_schema": "[a-c]{30}"})
  both = [sched.submit(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=1, grammar=grammar)),
          sched.submit(prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=2, grammar=grammar))]
  assert both[0].result(60).reason == "length"
  for event in both[1].events(60):  # cancelled after its first tokens, as a client gone away
    if isinstance(event, Delta):
      both[1].cancel()
  assert event.reason == "cancelled"
  sched.wait_idle()
  assert not np.asarray(sched._state.slots.guided).any()
  after = [sched.submit(prompt, plain) for _ in range(2)]  # both slots, each used by a guided request
  assert [h.result(60).token_ids for h in after] == [fresh, fresh]


def test_streamed_deltas_are_the_content(setup):
  client = setup[0]
  full = _chat(client, seed=5, n=2).json()["choices"]
  with client.stream("POST", "/v1/chat/completions", json={
      "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "temperature": 1.0,
      "response_format": RF, "seed": 5, "n": 2, "stream": True}) as s:
    chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
  for choice in full:
    k = choice["index"]
    mine = [c for chunk in chunks for c in chunk["choices"] if c["index"] == k]
    text = "".join(c["delta"].get("content") or "" for c in mine)
    assert text == choice["message"]["content"] and mine[-1]["finish_reason"] == choice["finish_reason"] == "stop"
    _fits(text)


def test_every_choice_owns_its_matcher(setup, monkeypatch):
  grammar = _grammar(setup, RF)
  import llguidance
  built = []
  real = llguidance.LLMatcher
  with monkeypatch.context() as m:
    m.setattr(llguidance, "LLMatcher", lambda *a, **k: built.append(a) or real(*a, **k))
    a, b = grammar.guide(), grammar.guide()
  assert not built  # copies of the compiled grammar, not a recompile on the caller's (event loop) thread
  first = a.mask()
  tok = setup[2]
  for t in tok.encode('{"drink": "caf'):
    assert a.consume(t)
  np.testing.assert_array_equal(b.mask(), first)  # b did not move with a
  assert not np.array_equal(a.mask(), first)
  r = _chat(setup[0], seed=9, n=3)
  assert r.status_code == 200 and len({c["message"]["content"] for c in r.json()["choices"]}) > 1
  for choice in r.json()["choices"]:
    _fits(choice["message"]["content"])


def test_stop_length_and_logprobs_with_a_grammar(setup):
  client, _, tok, _ = setup
  whole = _chat(client, seed=0).json()["choices"][0]["message"]["content"]
  _fits(whole)
  cut = _chat(client, seed=0, stop=[": "]).json()["choices"][0]
  assert cut["finish_reason"] == "stop" and cut["message"]["content"] == whole.split(": ")[0]
  quote = tok.encode('"')[-1]
  by_id = _chat(client, seed=0, stop_token_ids=[quote]).json()["choices"][0]
  head = by_id["message"]["content"]  # cut before the first '"' token: a stop id wins over the grammar
  assert by_id["finish_reason"] == "stop" and whole.startswith(head) and len(head) < len(whole)
  short = _chat(client, seed=0, max_tokens=4).json()["choices"][0]
  assert short["finish_reason"] == "length" and whole.startswith(short["message"]["content"])
  lp = _chat(client, seed=0, logprobs=True, top_logprobs=2).json()["choices"][0]
  assert lp["message"]["content"] == whole
  entries = lp["logprobs"]["content"]
  assert bytes(b for e in entries for b in e["bytes"]).decode() == whole and all(e["logprob"] <= 0 for e in entries)
  # The model's own distribution: its top tokens are mostly ones the grammar forbade (first token: only "{").
  assert any(t["token"] != "{" for t in entries[0]["top_logprobs"])


def test_grammar_bytes_are_the_decoded_text(setup):
  _, sched, tok, _ = setup
  V = sched.engine.config.vocab_size
  rng = np.random.default_rng(0)
  regex = "[a-zé ]{2,12}"
  for rf, check in [(RF, _fits), ({"type": "regex_schema", "regex_schema": regex}, lambda t: re.fullmatch(regex, t))]:
    grammar = _grammar(setup, rf)
    for _ in range(25):  # random walks over the tokens each mask allows (byte pieces, "▁" pieces, escapes)
      guide, stream, text = grammar.guide(), TextStream(tok), ""
      while not guide.done:
        allowed = np.flatnonzero(np.unpackbits(guide.mask().view(np.uint8), bitorder="little")[:V])
        choices = [t for t in allowed if t not in tok.stop_token_ids]
        if not choices:
          break
        token = int(rng.choice(choices))
        assert guide.consume(token), guide.error
        text += stream.append([token])
      text += stream.finish()
      assert check(text), text
  r = _chat(setup[0], seed=3, temperature=0.0)
  _fits(r.json()["choices"][0]["message"]["content"])


def test_a_dangling_backslash_regex_is_a_400(setup):
  r = _chat(setup[0], response_format={"type": "regex_schema", "regex_schema": "[0-9]+\\"})
  assert r.status_code == 400 and "backslash" in r.json()["error"]["message"], r.text
  ok = _chat(setup[0], max_tokens=6, response_format={"type": "regex_schema", "regex_schema": "[0-9]+\\\\"})
  assert ok.status_code == 200, ok.text


def test_a_grammar_over_the_tokenizer_vocabulary_fits_the_padded_model(setup):
  # Compiled for the tokenizer's 400 ids, not the model's 1024: the slot's mask must still fit, and a mistake in
  # one request must not fail the requests decoding beside it.
  _, sched, tok, _ = setup
  prompt = tok.encode_chat([{"role": "user", "content": "hi"}])
  plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
  fresh = sched.generate(prompt, plain, timeout=60).token_ids
  grammar = guided.compile_response_format({"type": "regex_schema", "regex_schema": "[a-c]{6}"}, tok, tok.vocab_size)
  held = sched.submit(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=0, grammar=grammar))
  beside = sched.submit(prompt, plain)
  out = held.result(60)
  assert out.reason == "stop" and re.fullmatch("[a-c]{6}", out.text), out
  assert beside.result(60).token_ids == fresh
