"""Decode buckets: a generate call runs only a power-of-two bucket of slots covering the live ones. A request's
tokens (greedy and seeded) must not depend on the others that come and go beside it, nor on its slot."""
import dataclasses

import numpy as np
import pytest

from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.sampling import SamplingParams
from internlm_jax.serve.testing import tiny_model

EC = EngineConfig(max_slots=32, max_seq_len=64, page_size=8, prefill_chunk=32, steps_per_call=4,
                  prefix_caching=False)
TARGETS = (9, 10)  # requests followed alone and in the crowd: one greedy, one seeded


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def requests(n, seed=0):
  """(prompt, params, seed, first generate call it joins) for n requests of mixed lengths and samplers; the
  TARGETS join first and stay longest, so the crowd grows and shrinks around them."""
  rng = np.random.RandomState(seed)
  out = []
  for i in range(n):
    params = SamplingParams(max_tokens=int(rng.randint(3, 20)), temperature=float(rng.choice([0.0, 0.8])),
                            top_k=int(rng.choice([0, 40])), ignore_eos=True)
    out.append((rng.randint(3, 1000, size=rng.randint(2, 30)).tolist(), params, i, int(rng.randint(0, 3))))
  for i, temperature in zip(TARGETS, (0.0, 0.8)):
    out[i] = (out[i][0], SamplingParams(max_tokens=30, temperature=temperature, ignore_eos=True), i, 0)
  return out


def drive(engine, work, slots, halt=False, steps_run=None):
  """Runs `work` on `engine`, request i in slots[i], joining at its call; -> ({i: tokens}, {i: logprobs}, the
  bucket's slots of every call). `halt`: calls end when a slot finishes (their step counts go to `steps_run`)."""
  buckets, bucket_rows = [], engine._bucket_rows

  def spy(live):
    rows = bucket_rows(live)
    buckets.append(rows.tolist())
    return rows

  engine._bucket_rows = spy
  state, tokens, logprobs, running, call = engine.init_state(), {}, {}, {}, 0
  pending = sorted(range(len(work)), key=lambda i: work[i][3])
  while pending or running:
    while pending and work[pending[0]][3] <= call:
      i = pending.pop(0)
      prompt, params, seed, _ = work[i]
      state, prefix = engine.prefill(state, prompt)
      state = engine.insert(prefix, state, slots[i], params, [], seed=seed)
      running[slots[i]], tokens[i], logprobs[i] = i, [], []
    for slot, i in running.items():
      engine.reserve(slot, min(engine.ec.steps_per_call, work[i][1].max_tokens - len(tokens[i])))
    state, result = engine.generate(state, halt_on_finish=halt)
    if steps_run is not None:
      steps_run.append(result.tokens.shape[0])
    for slot, i in list(running.items()):
      keep = result.valid[:, slot]
      tokens[i] += result.tokens[keep, slot].tolist()
      logprobs[i] += result.logprob[keep, slot].tolist()
      if len(tokens[i]) == work[i][1].max_tokens:
        state = engine.free(state, slot)
        del running[slot]
    call += 1
  engine.allocator.check_invariants()
  return tokens, logprobs, buckets


# min_bucket 1 (every bucket size, rounding-level differences allowed) is slow-marked: the fast suite's time budget.
@pytest.mark.parametrize("min_bucket", [16, pytest.param(1, marks=pytest.mark.slow)])
def test_request_output_does_not_depend_on_its_neighbours(model, min_bucket):
  config, params = model
  engine = Engine(params, config, dataclasses.replace(EC, min_decode_bucket=min_bucket))
  work = requests(30)
  slots = [int(s) for s in np.random.RandomState(1).permutation(EC.max_slots)[:len(work)]]
  crowd_tokens, crowd_lp, crowd_buckets = drive(engine, work, slots)
  for i, (_, p, _, _) in enumerate(work):
    assert len(crowd_tokens[i]) == p.max_tokens
  for target in TARGETS:
    solo_tokens, solo_lp, solo_buckets = drive(engine, [work[target]], [0])
    assert {len(rows) for rows in solo_buckets} == {min_bucket}
    # In the crowd it ran in another slot, in buckets of several sizes up to all 32 slots.
    sizes = {len(rows) for rows in crowd_buckets if slots[target] in rows}
    assert 32 in sizes and len(sizes) >= 2, sizes
    assert crowd_tokens[target] == solo_tokens[0]
    # Up to float rounding: the page-table width follows the longest neighbour (a wider masked attention sums in
    # another order), and a 1-row dot rounds differently from a many-row one.
    np.testing.assert_allclose(crowd_lp[target], solo_lp[0], atol=1e-5)


def test_buckets_match_the_full_batch(model):
  """Every request of a mixed workload gets bitwise the same tokens and logprobs as on an engine that always
  decodes all slots, when the buckets stay at or above XLA:CPU's dot-kernel switch (16 rows for this model)."""
  config, params = model
  work = requests(24, seed=3)
  slots = list(range(len(work)))
  full = drive(Engine(params, config, dataclasses.replace(EC, min_decode_bucket=EC.max_slots)), work, slots)
  engine = Engine(params, config, dataclasses.replace(EC, min_decode_bucket=16))
  bucketed = drive(engine, work, slots)
  bucketed_calls, compiled = len(bucketed[2]), engine._generate._cache_size()
  assert {len(rows) for rows in full[2]} == {32} and 16 in {len(rows) for rows in bucketed[2]}
  assert bucketed[0] == full[0]
  assert bucketed[1] == full[1]
  # generate(halt_on_finish=True), what the scheduler asks for while requests wait, ends a call after the step in
  # which a slot finishes: more, shorter calls, the same outputs bitwise, nothing recompiled.
  steps_run = []
  halted = drive(engine, work, slots, halt=True, steps_run=steps_run)
  assert halted[0] == full[0] and halted[1] == full[1]
  assert min(steps_run) < EC.steps_per_call and max(steps_run) == EC.steps_per_call
  assert len(steps_run) > bucketed_calls
  assert engine._generate._cache_size() == compiled


# Compiles every bucket (26 s): with the slow suite; the other bucket tests keep bucketing in the fast one.
@pytest.mark.slow
def test_warmup_compiles_every_bucket_and_changes_nothing(model):
  config, params = model
  engine = Engine(params, config, dataclasses.replace(EC, max_slots=8, min_decode_bucket=4))
  engine.warmup(engine.init_state())
  compiled = engine._generate._cache_size()
  assert compiled == 2 * 4  # buckets 4, 8 at widths 1, 2, 4, 8 pages
  work = requests(12)[:3]
  tokens, _, _ = drive(engine, work, [0, 1, 2])
  assert engine._generate._cache_size() == compiled
  assert all(len(tokens[i]) == work[i][1].max_tokens for i in range(3))
