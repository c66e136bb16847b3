"""OpenAI's presence/frequency penalties and logit_bias: the sampler against a numpy reference, the engine
against dense forwards, neighbours and later occupants of a slot left bitwise unchanged, and the HTTP checks."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient

from internlm_jax import forward
from internlm_jax.serve import sampling
from internlm_jax.serve.api import create_app
from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.sampling import SamplingError, SamplingParams
from internlm_jax.serve.scheduler import Delta, Finished, TokenInfo
from internlm_jax.serve.testing import tiny_model, tiny_tokenizer

B, V = 4, 50
MODEL = "tiny-internlm2"
EC = EngineConfig(max_slots=4, max_seq_len=96, page_size=8, prefill_chunk=16, steps_per_call=4)


def _logits(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, V)) * 3, jnp.float32)


_jit_sample = jax.jit(sampling.sample)  # one compile for every call below (eager dispatch is slower)


def _sample(logits, temperature=0.0, **kw):
  """The sampler's tokens (numpy) with no top-k/p, min-p or repetition penalty; features default to off."""
  keys = sampling.request_keys(jnp.arange(B, dtype=jnp.uint32), jnp.zeros((B,), jnp.int32))
  off = _rows([SamplingParams()] * B)
  kw = {k: kw.get(k, off[k]) for k in ("presence_penalty", "frequency_penalty", "counts", "bias_ids", "bias_values")}
  return np.asarray(_jit_sample(logits, keys, jnp.full((B,), temperature, jnp.float32), jnp.zeros((B,), jnp.int32),
                                jnp.ones((B,)), jnp.zeros((B,)), jnp.ones((B,)), jnp.zeros((B, V), bool), **kw))


def _rows(params, generated=()):
  rows = [sampling.penalty_rows(p, generated, V) for p in params]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_presence_frequency_penalties_match_the_openai_formula():
  # OpenAI's documented formula, which vLLM implements (apply_penalties: logits -= frequency * output counts,
  # then -= presence * (counts > 0)); counts are of generated tokens only. HF transformers has no equivalent.
  logits = _logits()
  counts = np.random.default_rng(1).integers(0, 4, size=(B, V)).astype(np.int16)
  counts[:, 0] = 300  # past int8: the state is int16
  presence = np.asarray([0.0, 1.5, 0.0, -0.7], np.float32)
  frequency = np.asarray([0.0, 0.0, 0.4, 2.0], np.float32)
  got = jax.jit(sampling.apply_presence_frequency)(logits, jnp.asarray(counts), jnp.asarray(presence),
                                                  jnp.asarray(frequency))
  want = np.asarray(logits) - presence[:, None] * (counts > 0) - frequency[:, None] * counts
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(got[0], logits[0])  # a row with neither penalty is bitwise unchanged
  # Through the sampler: greedy picks the reference's argmax; no penalised row skips the pass.
  kw = dict(counts=jnp.asarray(counts), presence_penalty=jnp.asarray(presence),
            frequency_penalty=jnp.asarray(frequency))
  np.testing.assert_array_equal(_sample(logits, **kw), want.argmax(-1))
  zero = jnp.zeros((B,), jnp.float32)
  np.testing.assert_array_equal(_sample(logits, counts=kw["counts"], presence_penalty=zero, frequency_penalty=zero),
                                jnp.argmax(logits, -1))


def test_counts_saturate_instead_of_wrapping():
  counts = jnp.asarray([[0, sampling.MAX_COUNT - 1, 0]] * 2, jnp.int16)
  bump = jax.jit(sampling.count_tokens)
  counts = bump(counts, jnp.asarray([1, 1]), jnp.asarray([True, False]))
  counts = bump(counts, jnp.asarray([1, 0]), jnp.asarray([True, True]))
  np.testing.assert_array_equal(counts, [[0, sampling.MAX_COUNT, 0], [1, sampling.MAX_COUNT - 1, 0]])


def test_logit_bias_bans_and_forces_tokens_greedy_and_sampled():
  logits = _logits(2)
  best = np.asarray(jnp.argmax(logits, -1))
  second = np.asarray(jnp.argsort(-logits, -1)[:, 1])
  worst = np.asarray(jnp.argmin(logits, -1))
  params = [SamplingParams(logit_bias={int(best[0]): -100.0}), SamplingParams(logit_bias={int(worst[1]): 100.0}),
            SamplingParams(), SamplingParams(logit_bias=((int(worst[3]), 100.0), (int(best[3]), -5.0)))]
  rows = _rows(params)
  kw = dict(bias_ids=rows["bias_ids"], bias_values=rows["bias_values"])
  want = [second[0], worst[1], best[2], worst[3]]
  np.testing.assert_array_equal(_sample(logits, **kw), want)
  np.testing.assert_array_equal(_sample(logits, temperature=1.0, **kw)[[1, 3]], [worst[1], worst[3]])
  biased = jax.jit(sampling.apply_logit_bias)(logits, kw["bias_ids"], kw["bias_values"])
  np.testing.assert_array_equal(biased[2], logits[2])
  assert float(biased[3, worst[3]]) == pytest.approx(float(logits[3, worst[3]]) + 100.0)
  assert float(biased[3, best[3]]) == pytest.approx(float(logits[3, best[3]]) - 5.0)
  assert int(jnp.sum(biased != logits)) == 4  # the -1 padding touches nothing (token V - 1 included)


def test_sampling_params_validate_penalties_and_bias():
  ok = SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, logit_bias={3: 100.0, 4: -100})
  assert ok.validate(V).logit_bias == ((3, 100.0), (4, -100))
  hash(ok)  # params stay hashable with a bias
  bad = [(dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3.0), "frequency_penalty"),
         (dict(frequency_penalty=float("nan")), "frequency_penalty"),
         (dict(logit_bias={V: 1.0}), "logit_bias keys must be token ids in \\[0, 50\\)"),
         (dict(logit_bias={-1: 1.0}), "logit_bias keys"), (dict(logit_bias={"3": 1.0}), "logit_bias keys"),
         (dict(logit_bias={3: 100.5}), "logit_bias values"), (dict(logit_bias=((3, 1.0), (3, 2.0))), "more than once"),
         (dict(logit_bias={i: 1.0 for i in range(301)}), "at most 300")]
  for kw, needle in bad:
    with pytest.raises(SamplingError, match=needle) as e:
      SamplingParams(**kw).validate(1000 if "300" in needle else V)
    assert e.value.param == next(iter(kw)), kw
  assert SamplingParams(logit_bias=[[3, 1.0]]).logit_bias == ((3, 1.0),)
  counts = sampling.penalty_rows(SamplingParams(frequency_penalty=1.0), [5, 5, 7], V)["counts"]
  assert counts[5] == 2 and counts[7] == 1 and counts.sum() == 3
  assert not sampling.penalty_rows(SamplingParams(), [5], V)["counts"].any()  # unused: not counted


# ---- engine ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def engine(model):
  """One engine and its state for the module (prefix caching on: later requests hit earlier prompts' pages)."""
  config, params = model
  eng = Engine(params, config, EC)
  return eng, [eng.init_state()]


def prompt(seed, n=8):
  """A prompt of n tokens; at 8 (the page size) it never hits the prefix cache, whose shorter prefill can round
  the first logits differently."""
  return np.random.RandomState(seed).randint(3, 1000, size=n).tolist()


def run(engine, jobs, first_call=None):
  """Runs jobs {slot: (prompt, params, seed)} together until each has its max_tokens (or, with first_call,
  only that many generate calls) -> {slot: (tokens, logprobs)}; frees the slots."""
  eng, holder = engine
  state, out = holder[0], {}
  for slot, (tokens, params, seed) in jobs.items():
    state, prefix = eng.prefill(state, tokens)
    state = eng.insert(prefix, state, slot, params, [], seed=seed)
    out[slot] = ([], [])
  calls = 0
  while any(len(out[s][0]) < jobs[s][1].max_tokens for s in jobs) and calls != first_call:
    for s in jobs:
      eng.reserve(s, min(EC.steps_per_call, jobs[s][1].max_tokens - len(out[s][0])))
    state, result = eng.generate(state)
    for s in jobs:
      keep = result.valid[:, s]
      out[s][0].extend(result.tokens[keep, s].tolist())
      out[s][1].extend(result.logprob[keep, s].tolist())
    calls += 1
  for s in jobs:
    state = eng.free(state, s)
  holder[0] = state
  eng.allocator.check_invariants()
  return out


_dense_forward = {}


def penalised_reference(model, tokens, n, presence, frequency, bias):
  """Greedy continuation by dense forwards with the penalties and bias applied in numpy."""
  config, params = model
  fwd = _dense_forward.setdefault(config, jax.jit(lambda p, t: forward(p, t, config)))
  seq, counts = list(tokens), np.zeros((config.vocab_size,))
  dense_bias = np.zeros((config.vocab_size,))
  dense_bias[list(bias)] = list(bias.values())
  for _ in range(n):
    padded = np.zeros((1, 96), np.int32)
    padded[0, :len(seq)] = seq
    row = np.asarray(fwd(params, padded)[0, len(seq) - 1])
    token = int(np.argmax(row - presence * (counts > 0) - frequency * counts + dense_bias))
    counts[token] += 1
    seq.append(token)
  return seq[len(tokens):]


def test_engine_penalties_follow_the_dense_reference_and_cut_repeats(model, engine):
  # The tiny random model's logits are nearly flat (no repeats of its own): a bias on two tokens makes it loop.
  n, bias = 16, {40: 3.0, 41: 2.5}
  looping = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logit_bias=bias)
  penalised = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logit_bias=bias, presence_penalty=0.5,
                             frequency_penalty=1.0)
  out = run(engine, {0: (prompt(0), looping, 0), 1: (prompt(0), penalised, 0)})
  assert out[0][0] == penalised_reference(model, prompt(0), n, 0.0, 0.0, bias) == [40] * n
  assert out[1][0] == penalised_reference(model, prompt(0), n, 0.5, 1.0, bias)
  repeats = lambda tokens: len(tokens) - len(set(tokens))
  assert repeats(out[1][0]) <= 6, out
  # Logprobs stay the model's own (near log(1/1024) here, not the biased ~0), penalties or not.
  assert max(out[0][1]) < -5 and out[0][0][0] == out[1][0][0]
  assert out[0][1][0] == pytest.approx(out[1][1][0], abs=1e-5)


def test_penalised_neighbour_leaves_plain_requests_bitwise_unchanged(engine):
  greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
  seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, ignore_eos=True)
  loud = SamplingParams(max_tokens=10, temperature=0.7, ignore_eos=True, presence_penalty=2.0,
                        frequency_penalty=-1.0, logit_bias={7: 100.0, 11: -100.0, 1023: 5.0})
  plain_jobs = {0: (prompt(1), greedy, 1), 2: (prompt(2), seeded, 2)}
  alone = run(engine, plain_jobs)
  crowd = run(engine, {**plain_jobs, 1: (prompt(3), loud, 3), 3: (prompt(4), loud, 4)})
  assert crowd[0] == alone[0] and crowd[2] == alone[2]  # tokens and logprobs, bitwise
  assert crowd[1][0] == [7] * 10 and crowd[3][0] == [7] * 10  # +100 forces a token whatever the sampling


def test_freed_slot_starts_with_zero_counts_and_no_bias(engine):
  plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
  before = run(engine, {2: (prompt(5), plain, 0)})
  # Bans the plain request's own tokens: a bias left behind in the slot would change its output.
  penalised = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=2.0,
                             logit_bias={t: -100.0 for t in before[2][0]})
  first = run(engine, {2: (prompt(6, 17), penalised, 0)})
  second = run(engine, {2: (prompt(6, 17), penalised, 0)})  # its prompt's pages now come from the prefix cache
  after = run(engine, {2: (prompt(5), plain, 0)})
  assert not set(first[2][0]) & set(before[2][0])
  assert after == before and second == first  # counts start at zero for a new request


def test_freed_slot_turns_its_penalties_and_bias_off(engine):
  # An idle slot still pads decode buckets: a stale penalty or bias row would keep their [b, V] passes (skipped by
  # cond only when no row asks for them) running for every later generate call.
  eng, holder = engine
  loud = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                        presence_penalty=1.0, frequency_penalty=0.5, logit_bias={7: 2.0})
  run(engine, {3: (prompt(8), loud, 0)})
  s = holder[0].slots
  assert not np.any(np.asarray(s.presence_penalty)) and not np.any(np.asarray(s.frequency_penalty))
  assert np.all(np.asarray(s.repetition_penalty) == 1.0) and np.all(np.asarray(s.bias_ids) == -1)


def test_preempted_request_resumes_with_its_counts(engine):
  eng, holder = engine
  params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.0,
                          frequency_penalty=1.5)
  whole = run(engine, {1: (prompt(7), params, 0)})[1][0]
  head = run(engine, {1: (prompt(7), params, 0)}, first_call=1)[1][0]
  assert head == whole[:len(head)] and 0 < len(head) < len(whole)
  # Re-admitted as the scheduler does after a preemption: prompt + output prefilled, the output as `generated`.
  state, prefix = eng.prefill(holder[0], prompt(7) + head)
  state = eng.insert(prefix, state, 1, params, [], seed=0, generated=head)
  tail = []
  while len(head) + len(tail) < len(whole):
    eng.reserve(1, EC.steps_per_call)
    state, result = eng.generate(state)
    tail += result.tokens[result.valid[:, 1], 1].tolist()
  holder[0] = eng.free(state, 1)
  assert head + tail == whole


# ---- HTTP -------------------------------------------------------------------------------------------------------
class RecordingScheduler:
  """Validates each request's params as the real scheduler does (vocabulary 1024, the tiny model's), records them
  and answers at once: the wire-to-SamplingParams path without compiling an engine (the engine tests above cover
  what the engine does with them)."""

  def __init__(self, tok):
    self.engine = types.SimpleNamespace(max_seq_len=4096, max_request_tokens=4096)
    self.tok, self.params = tok, []

  def stats(self):
    return {}

  def submit(self, prompt, params, sink):
    self.params.append(params.validate(1024))
    ids = self.tok.encode("ok")
    sink(Delta("ok", [TokenInfo(i) for i in ids]))
    sink(Finished("stop", "ok", ids, len(prompt), 0))
    return types.SimpleNamespace(cancel=lambda: None)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
  tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
  sched = RecordingScheduler(tok)
  return TestClient(create_app(sched, tok, MODEL), raise_server_exceptions=False), sched


def test_http_accepts_penalties_and_logit_bias(client):
  c, sched = client
  body = {"model": MODEL, "prompt": "The quick brown", "max_tokens": 3, "presence_penalty": 1.5,
          "frequency_penalty": -0.5, "logit_bias": {"17": 100, "300": -100, "0": 0.25}}
  r = c.post("/v1/completions", json=body)
  assert r.status_code == 200, r.json()
  got = sched.params[-1]
  assert (got.presence_penalty, got.frequency_penalty) == (1.5, -0.5)
  assert got.logit_bias == ((17, 100.0), (300, -100.0), (0, 0.25))
  chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
          "presence_penalty": 0.3, "frequency_penalty": 2, "logit_bias": {"5": 2.5}}
  r = c.post("/v1/chat/completions", json=chat)
  assert r.status_code == 200, r.json()
  got = sched.params[-1]
  assert (got.presence_penalty, got.frequency_penalty, got.logit_bias) == (0.3, 2.0, ((5, 2.5),))
  r = c.post("/v1/chat/completions", json={**chat, "presence_penalty": None, "frequency_penalty": 0,
                                          "logit_bias": None})
  assert r.status_code == 200, r.json()
  got = sched.params[-1]
  assert (got.presence_penalty, got.frequency_penalty, got.logit_bias) == (0.0, 0.0, ())


@pytest.mark.parametrize("change,param,needle", [
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty"),
    ({"frequency_penalty": -2.1}, "frequency_penalty", "frequency_penalty"),
    ({"logit_bias": {"fox": 1}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"logit_bias": {"-3": 1}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "logit_bias values"),
    ({"logit_bias": {"5": 1, "05": 2}}, "logit_bias", "twice"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ({"logit_bias": {"5": "lots"}}, "logit_bias.5", "logit_bias"),
    # Past the model's vocabulary: SamplingParams.validate's check, its param carried into the 400.
    ({"logit_bias": {"5000": 1}}, "logit_bias", "logit_bias keys must be token ids in [0, 1024)"),
])
def test_http_bad_penalties_and_logit_bias_are_400(client, change, param, needle):
  c, _ = client
  for path, base in (("/v1/completions", {"prompt": "hi"}),
                     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
    r = c.post(path, json={"model": MODEL, "max_tokens": 2, **base, **change})
    error = r.json()["error"]
    assert r.status_code == 400 and needle in error["message"], (path, error)
    if param is not None:
      assert error["param"] == param, (path, error)


def test_bias_and_stop_ids_past_the_sampled_vocabulary_are_refused():
  # A model vocabulary padded past the tokenizer's: ids from sample_vocab up are never sampled, so a bias or a stop
  # id there would silently do nothing. The scheduler validates against the sampled vocabulary.
  from internlm_jax.serve.kv_cache import PageAllocator
  from internlm_jax.serve.scheduler import Scheduler
  engine = types.SimpleNamespace(ec=types.SimpleNamespace(max_slots=1, sample_vocab=100),
                                 config=types.SimpleNamespace(vocab_size=128),
                                 allocator=PageAllocator(num_pages=5, page_size=8, max_slots=1, pages_per_seq=4),
                                 init_state=lambda: None, check_request=lambda *a: None, max_seq_len=32,
                                 max_request_tokens=32)
  sched = Scheduler(engine, types.SimpleNamespace(), max_queue=4, default_stop_ids=(2,))  # never started
  for params in (SamplingParams(logit_bias={120: 5.0}), SamplingParams(stop_token_ids=(110,))):
    with pytest.raises(SamplingError, match=r"\[0, 100\)"):
      sched.submit([1, 5], params)
  sched.submit([1, 5], SamplingParams(logit_bias={99: 5.0}))


def test_min_tokens_holds_off_the_stop_ids():
  logits = _logits()
  stop_ids = jnp.asarray([[int(np.argmax(logits[b])), -1] for b in range(B)], jnp.int32)  # each row's argmax
  steps = jnp.asarray([0, 3, 5, 0], jnp.int32)
  min_tokens = jnp.asarray([2, 3, 9, 0], jnp.int32)  # rows 0 and 2 are early
  got = np.asarray(jax.jit(sampling.apply_min_tokens)(logits, stop_ids, steps, min_tokens))
  for b in range(B):
    early = int(steps[b]) < int(min_tokens[b])
    assert np.isneginf(got[b, int(stop_ids[b, 0])]) == early
    others = np.arange(V) != int(stop_ids[b, 0])
    np.testing.assert_array_equal(got[b, others], np.asarray(logits)[b, others])

