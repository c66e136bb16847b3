"""The load benchmark's pieces: static batching really is static, traces replay, and the headline ratio is read
at the latency objective (null when static never meets it)."""
import numpy as np
import pytest

from internlm_jax.serve import bench_load as bl
from internlm_jax.serve.engine import Engine, EngineConfig
from internlm_jax.serve.testing import tiny_model


def point(rate, tok_s, ttft_p99):
  return {"output_tokens_per_sec": tok_s, "ttft_p99_s": ttft_p99}


def run(rate, static, continuous):
  return {"rate": rate, "static": point(rate, *static), "continuous": point(rate, *continuous)}


def test_ratio_is_taken_at_the_slo():
  # At 3 req/s static met the SLO but its trace drew a long tail: its best run (2 req/s) counts.
  runs = [run(1.0, (40, 8), (41, 1)), run(2.0, (70, 15), (80, 2)), run(3.0, (65, 18), (120, 4)),
          run(4.0, (90, 40), (150, 9)), run(8.0, (95, 80), (190, 30))]
  out = bl.continuous_vs_static(runs, slo_s=20)
  assert out["continuous_vs_static_by_slo"]["10.0"] == pytest.approx(150 / 40)
  assert out["static_at_slo"]["rate"] == 2.0 and out["continuous_at_slo"]["rate"] == 4.0
  assert out["continuous_vs_static"] == pytest.approx(150 / 70)
  assert out["continuous_vs_static_saturated"] == pytest.approx(190 / 95)
  assert bl.continuous_vs_static(runs, slo_s=5)["continuous_vs_static"] is None  # static never met 5 s


def test_traces_replay_and_lengths_stay_in_range():
  a = bl.sharegpt_like(50, np.random.default_rng(0), 1000)
  assert a == bl.sharegpt_like(50, np.random.default_rng(0), 1000)
  assert all(8 <= len(p) <= 192 and 4 <= o <= 128 for p, o in a)
  arrivals = bl.poisson_arrivals(2000, 4.0, np.random.default_rng(1))
  assert arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)
  assert np.mean(np.diff(arrivals)) == pytest.approx(0.25, rel=0.1)
  assert not bl.poisson_arrivals(5, float("inf"), np.random.default_rng(1)).any()


def test_static_batches_wait_for_the_whole_batch():
  config, params = tiny_model()
  engine = Engine(params, config, EngineConfig(max_slots=4, max_seq_len=64, page_size=8, prefill_chunk=32,
                                               steps_per_call=4, prefix_caching=False))
  rng = np.random.default_rng(0)
  work = [(rng.integers(3, 1000, 10).tolist(), n) for n in (2, 30, 3, 3, 3)]
  out = bl.run_static(engine, work, np.zeros(len(work)))
  # Four start together; the fifth waits for the 30-token one, so it starts after 8 decode calls.
  assert out["timings"]["batches"] == 2
  assert out["timings"]["generate_calls"] == 8 + 1
  assert out["ttft_p99_s"] > out["ttft_p50_s"]
  engine.allocator.check_invariants()
  assert engine.allocator.num_available == engine.allocator.usable_pages
  # The textbook batcher: all four rows of the first batch run the 30 tokens, the fifth its own 3.
  padded = bl.run_static(engine, work, np.zeros(len(work)), rows_to_longest=True)
  assert padded["timings"]["slot_steps_used"] == 4 * 30 + 3 and out["timings"]["slot_steps_used"] == 2 + 30 + 3 * 3
  assert padded["timings"]["generate_calls"] == 8 + 1
  assert padded["latency_p50_s"] < padded["makespan_s"]  # a short request is done when its own tokens are out
  engine.allocator.check_invariants()
  assert engine.allocator.num_available == engine.allocator.usable_pages


def test_repeated_rates_count_by_their_medians():
  runs = [run(2.0, (70, 15), (80, 2)), run(2.0, (60, 25), (90, 3)), run(2.0, (50, 12), (70, 1)),
          run(4.0, (90, 40), (150, 9))]
  merged = bl.median_by_rate(runs)
  assert [m["rate"] for m in merged] == [2.0, 4.0] and merged[0]["repeats"] == 3
  assert merged[0]["static"] == {"output_tokens_per_sec": 60, "ttft_p99_s": 15}
  assert bl.continuous_vs_static(merged, slo_s=20)["continuous_vs_static"] == pytest.approx(150 / 60)
