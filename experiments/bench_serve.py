"""Serving benchmark on a ~125M Llama-shaped InternLM2 (random weights): decode speed against the machine's
bandwidth and two peers, and continuous vs static batching under Poisson load.

  python experiments/bench_serve.py --out=/tmp/bench_serve.json [--requests=200 --rates=auto --sections=decode,load]

One run measures: (a) our Engine's decode tokens/s at batch 1 and 32 (greedy, after the prompt), with
memory-bandwidth utilisation against the bandwidth a jitted matvec over a weight-sized array reaches (the read
pattern of a batch-1 decode step); float32 and int8 weights (int8: the native FFI kernel when it builds, see
native/qmatmul.py; INTERNLM_JAX_NATIVE=0 times the pure-JAX path). (b) transformers' LlamaForCausalLM.generate
on the same weights (PyTorch CPU), same prompts and lengths. (c) the Scheduler in-process under Poisson arrivals of
requests with a ShareGPT-like (log-normal) spread of prompt and output lengths, against static batching (batches
formed from what is waiting, run until their longest member ends) on the same engine and trace. (d) llama.cpp
(llama-cpp-python) decoding the same weights exported to GGUF (f32 and q8_0) at batch 1. Peers that are not
installed leave their keys null. Prints a ratio table and writes JSON.
"""
import collections
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

OUT = flags.DEFINE_string("out", None, "JSON results file")
PROMPT = flags.DEFINE_integer("prompt_len", 32, "prompt tokens for the decode benchmarks")
NEW = flags.DEFINE_integer("new_tokens", 64, "decoded tokens per sequence for the decode benchmarks")
STEPS = flags.DEFINE_integer("steps_per_call", 8, "engine decode steps per host round trip")
REQUESTS = flags.DEFINE_integer("requests", 200, "requests per load run")
RATES = flags.DEFINE_string("rates", "auto", "arrival rates (req/s), comma separated; auto: 0.5, 1 and 2 times "
                            "the capacity estimated from the trace's prefill time and batch-32 decode")
SLOTS = flags.DEFINE_integer("slots", 32, "engine slots for the load runs")
TORCH = flags.DEFINE_bool("torch", True, "time transformers generate")
LLAMACPP = flags.DEFINE_bool("llamacpp", True, "time llama.cpp (if llama_cpp is installed)")
SEED = flags.DEFINE_integer("seed", 0, "weights, prompts and arrival trace")
SECTIONS = flags.DEFINE_list("sections", ["decode", "load"], "decode: (a) ours, with (b) and (d) per --torch and "
                             "--llamacpp; load: (c)")


def bench_config():
  from internlm_jax.config import ModelConfig
  return ModelConfig(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                     intermediate_size=2048, max_position_embeddings=2048, rope_scaling_type=None, rope_theta=1e4)


def _median_seconds(fn, repeats):
  from internlm_jax.train.metrics import median_seconds
  return median_seconds(fn, repeats)


# ---- (a) bandwidth and our decode ---------------------------------------------------------------------------
def measure_bandwidth(nbytes: int, repeats: int = 10) -> dict:
  """GB/s of a jitted matvec and of a sum over a float32 array of `nbytes`, each reading it once."""
  import jax
  import jax.numpy as jnp
  w = jax.random.normal(jax.random.key(1), (nbytes // (4 * 768), 768), jnp.float32)
  x = jnp.ones((768,), jnp.float32)
  matvec, total = jax.jit(lambda w, x: w @ x), jax.jit(jnp.sum)
  out = {}
  for name, fn in (("matvec", lambda: matvec(w, x).block_until_ready()), ("sum", lambda: total(w).block_until_ready())):
    fn()
    out[name] = w.nbytes / _median_seconds(fn, repeats) / 1e9
  return out


def decode_bytes(config, params, batch: int, context: int) -> int:
  """Bytes one decode step reads: every weight but the embedding table (a gather of `batch` rows), plus the
  keys and values of `context` positions per sequence."""
  from internlm_jax import quant
  weights = quant.nbytes(params) - quant.nbytes(params["embed"])
  kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4 * context * batch
  return weights + kv


def bench_engine(config, params, prompts, new_tokens, steps):
  """Greedy decode of `new_tokens` per prompt, all prompts in one batch -> (tokens/s, tokens [B, n], logits of
  the first prompt's next token)."""
  import numpy as np
  from internlm_jax.serve.engine import Engine, EngineConfig
  from internlm_jax.serve.sampling import SamplingParams
  B, ps = len(prompts), 16
  seq = -(-(len(prompts[0]) + new_tokens) // ps) * ps
  engine = Engine(params, config, EngineConfig(max_slots=B, max_seq_len=seq, page_size=ps, steps_per_call=steps,
                                               prefill_chunk=64, prefix_caching=False))
  greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

  def run():
    state = engine.init_state()
    for b, prompt in enumerate(prompts):
      state, prefix = engine.prefill(state, prompt)
      if b == 0:
        first_logits = prefix.logits
      state = engine.insert(prefix, state, b, greedy, [], seed=b)
    state.slots.logits.block_until_ready()
    start, tokens = time.perf_counter(), []
    for _ in range(new_tokens // steps):
      for b in range(B):
        engine.reserve(b, steps)
      state, result = engine.generate(state)
      tokens.append(result.tokens)
    seconds = time.perf_counter() - start
    for b in range(B):
      state = engine.free(state, b)
    return seconds, np.concatenate(tokens).T, np.asarray(first_logits)

  run()  # compiles
  seconds, tokens, logits = min((run() for _ in range(2)), key=lambda r: r[0])
  return B * tokens.shape[1] / seconds, tokens, logits


# ---- (b) transformers ---------------------------------------------------------------------------------------
# ---- (c) load: continuous vs static batching ----------------------------------------------------------------
def sharegpt_like(n, rng, vocab):
  """(prompt ids, output length) pairs: log-normal lengths like ShareGPT's, scaled down for a 2-core CPU."""
  prompts = rng.lognormal(4.0, 0.8, n).clip(8, 192).astype(int)  # median ~55 tokens
  outputs = rng.lognormal(3.5, 0.8, n).clip(4, 128).astype(int)  # median ~33 tokens
  return [(rng.integers(3, vocab, p).tolist(), int(o)) for p, o in zip(prompts, outputs)]


def _summary(work, arrivals, first, done, timings=None):
  makespan = max(done.values())
  ttft = sorted(first[i] - arrivals[i] for i in range(len(work)))
  latency = sorted(done[i] - arrivals[i] for i in range(len(work)))
  pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
  out = {"requests_per_sec": len(work) / makespan, "output_tokens_per_sec": sum(o for _, o in work) / makespan,
         "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "latency_p50_s": pct(latency, 0.5),
         "latency_p99_s": pct(latency, 0.99), "makespan_s": makespan}
  if timings:
    out["timings"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}
  return out


def run_static(engine, work, arrivals, steps):
  from internlm_jax.serve.sampling import SamplingParams
  state, B = engine.init_state(), engine.ec.max_slots
  first, done, waiting, nxt = {}, {}, collections.deque(), 0
  timings = collections.Counter()
  start = time.perf_counter()
  while len(done) < len(work):
    now = time.perf_counter() - start
    while nxt < len(work) and arrivals[nxt] <= now:
      waiting.append(nxt)
      nxt += 1
    if not waiting:
      time.sleep(max(0.0, arrivals[nxt] - now))
      continue
    batch = [waiting.popleft() for _ in range(min(B, len(waiting)))]
    left = {}
    t0 = time.perf_counter()
    for slot, r in enumerate(batch):
      state, prefix = engine.prefill(state, work[r][0])
      params = SamplingParams(max_tokens=work[r][1], temperature=0.0, ignore_eos=True)
      state = engine.insert(prefix, state, slot, params, [], seed=r)
      left[slot] = work[r][1]
    timings["admit_s"] += time.perf_counter() - t0
    timings["batches"] += 1
    while any(left.values()):  # the batch runs until its longest request ends; finished slots idle
      for slot, n in left.items():
        if n:
          engine.reserve(slot, min(steps, n))
      t0 = time.perf_counter()
      state, result = engine.generate(state)
      timings["generate_s"] += time.perf_counter() - t0
      timings["generate_calls"] += 1
      timings["slot_steps_used"] += int(result.valid.sum())
      timings["slot_steps"] += result.valid.size
      now = time.perf_counter() - start
      for slot, r in enumerate(batch):
        got = int(result.valid[:, slot].sum())
        if got:
          first.setdefault(r, now)
          left[slot] -= got
          if not left[slot]:
            done[r] = now
    for slot in range(len(batch)):
      state = engine.free(state, slot)
  return _summary(work, arrivals, first, done, timings)


def run_continuous(engine, tokenizer, work, arrivals):
  from internlm_jax.serve.sampling import SamplingParams
  from internlm_jax.serve.scheduler import Finished, Scheduler
  sched = Scheduler(engine, tokenizer, max_queue=len(work)).start()
  first, done, lock, finished = {}, {}, threading.Lock(), threading.Event()
  start = time.perf_counter()

  def sink(r):
    def receive(event):
      now = time.perf_counter() - start
      with lock:
        first.setdefault(r, now)
        if isinstance(event, Finished):
          done[r] = now
          if len(done) == len(work):
            finished.set()
    return receive

  for r, (prompt, out) in enumerate(work):
    time.sleep(max(0.0, arrivals[r] - (time.perf_counter() - start)))
    sched.submit(prompt, SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True), sink=sink(r))
  finished.wait(timeout=1800)
  sched.stop()
  assert len(done) == len(work), "the continuous run did not finish"
  return _summary(work, arrivals, first, done, sched.timings)


def load_engine(config, params, work, slots, steps):
  """The load runs' engine, with every prefill shape the trace needs and the decode step compiled -> (engine,
  mean seconds to prefill one request of the trace)."""
  from internlm_jax.serve.engine import Engine, EngineConfig, prefill_bucket
  # Prefix caching off: every run replays the same prompts, which a warm cache would serve for free.
  ec = EngineConfig(max_slots=slots, max_seq_len=320, page_size=16, prefill_chunk=256, steps_per_call=steps,
                    prefix_caching=False)
  engine = Engine(params, config, ec)
  state, seconds = engine.init_state(), {}
  for C in sorted({prefill_bucket(len(p), ec.prefill_chunk) for p, _ in work}):
    for _ in range(2):  # the second call is timed
      t0 = time.perf_counter()
      state, prefix = engine.prefill(state, list(range(3, 3 + C)))
      prefix.logits.block_until_ready()
      seconds[C] = time.perf_counter() - t0
      engine.release(prefix)
  run_static(engine, work[:2], [0.0, 0.0], steps)
  return engine, sum(seconds[prefill_bucket(len(p), ec.prefill_chunk)] for p, _ in work) / len(work)


def bench_load(engine, work, rates, steps, rng):
  import numpy as np
  from internlm_jax.serve.testing import tiny_tokenizer
  n = len(work)
  tokenizer = tiny_tokenizer(tempfile.mkdtemp())  # output ids past its vocabulary decode to nothing
  runs = []
  for rate in rates:
    gaps = rng.exponential(1.0 / rate, n) if rate != float("inf") else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]
    static = run_static(engine, work, arrivals, steps)
    continuous = run_continuous(engine, tokenizer, work, arrivals)
    runs.append({"rate": rate, "static": static, "continuous": continuous})
    for name, r in (("continuous", continuous), ("static", static)):
      print(f"  load {rate:.2f} req/s {name:>10}: {r['requests_per_sec']:.2f} req/s, {r['output_tokens_per_sec']:.1f} "
            f"out tok/s, TTFT p50/p99 {r['ttft_p50_s']:.2f}/{r['ttft_p99_s']:.2f} s, latency p50 "
            f"{r['latency_p50_s']:.2f} s; {r.get('timings')}", flush=True)
  return runs


# ---- main ---------------------------------------------------------------------------------------------------
TABLE = [("bandwidth (best of matvec/sum)", "bandwidth_gbps", " GB/s"),
         ("ours batch 1", "decode_tokens_per_sec_batch1", " tok/s"), ("  MBU batch 1", "mbu_batch1", ""),
         ("ours batch 1 int8", "decode_tokens_per_sec_batch1_int8", " tok/s"),
         ("ours batch 32", "decode_tokens_per_sec_batch32", " tok/s"),
         ("ours batch 32 int8", "decode_tokens_per_sec_batch32_int8", " tok/s"),
         ("transformers batch 1", "transformers_tokens_per_sec_batch1", " tok/s"),
         ("transformers batch 32", "transformers_tokens_per_sec_batch32", " tok/s"),
         ("llama.cpp f32 batch 1", "llamacpp_tokens_per_sec_batch1_f32", " tok/s"),
         ("llama.cpp q8_0 batch 1", "llamacpp_tokens_per_sec_batch1_q8_0", " tok/s"),
         ("ours / llama.cpp f32, b1", "vs_llamacpp_batch1", "x"),
         ("ours int8 / llama.cpp q8_0, b1", "vs_llamacpp_batch1_int8_vs_q8_0", "x"),
         ("ours / transformers, b32", "speedup_vs_transformers_batch32", "x"),
         ("ours int8 / transformers f32, b32", "speedup_vs_transformers_batch32_int8", "x"),
         ("continuous / static", "continuous_vs_static", "x output tok/s at the top rate")]


def main(argv):
  del argv
  import jax
  import numpy as np
  from internlm_jax import quant
  from internlm_jax.model import init_params
  from internlm_jax.native import qmatmul
  from internlm_jax.serve import paged_model
  config = bench_config()
  params = init_params(config, jax.random.key(SEED.value))
  rng = np.random.default_rng(SEED.value)
  P, N, S = PROMPT.value, NEW.value, STEPS.value
  prompts = rng.integers(3, config.vocab_size, (32, P)).tolist()
  res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores",
         "params": config.num_params(), "prompt_len": P, "new_tokens": N, "steps_per_call": S}
  for key in ("transformers_tokens_per_sec_batch1", "transformers_tokens_per_sec_batch32",
              "speedup_vs_transformers_batch32", "speedup_vs_transformers_batch32_int8",
              "llamacpp_tokens_per_sec_batch1_f32",
              "llamacpp_tokens_per_sec_batch1_q8_0", "vs_llamacpp_batch1", "vs_llamacpp_batch1_int8_vs_q8_0",
              "continuous_vs_static"):
    res[key] = None

  def save(section):  # after every section, so a run cut short still leaves its numbers
    print(section, {k: v for k, v in res.items() if not isinstance(v, (list, dict))}, flush=True)
    if OUT.value:
      with open(OUT.value, "w") as f:
        json.dump(res, f, indent=2)

  bw = measure_bandwidth(quant.nbytes(params) - quant.nbytes(params["embed"]))
  tps1, ours_tokens, ours_logits = bench_engine(config, params, prompts[:1], N, S)
  tps32, _, _ = bench_engine(config, params, prompts, N, S)
  q8 = quant.quantize_params(params, "int8")
  tps1_q8, _, _ = bench_engine(config, q8, prompts[:1], N, S)
  tps32_q8, _, _ = bench_engine(config, q8, prompts, N, S)
  peak = max(bw.values()) * 1e9
  res.update(bandwidth_gbps=peak / 1e9, bandwidth_detail=bw, decode_tokens_per_sec_batch1=tps1,
             decode_tokens_per_sec_batch32=tps32, decode_tokens_per_sec_batch1_int8=tps1_q8,
             decode_tokens_per_sec_batch32_int8=tps32_q8, native_int8=paged_model.native_int8(q8, config),
             native_vnni_min_rows=qmatmul.vnni_min_rows(),
             mbu_batch1=decode_bytes(config, params, 1, P + N // 2) * tps1 / peak,
             mbu_batch1_int8=decode_bytes(config, q8, 1, P + N // 2) * tps1_q8 / peak,
             mbu_batch32=decode_bytes(config, params, 32, P + N // 2) * tps32 / 32 / peak)
  save("ours")

  if TORCH.value and "decode" in SECTIONS.value:
    import torch
    from internlm_jax.serve.bench_peers import bench_transformers, llama_model
    model = llama_model(config, params)
    with torch.no_grad():
      theirs = model(input_ids=torch.tensor(prompts[:1])).logits[0, -1].numpy()
    (t1, th1), (t32, th32) = bench_transformers(model, prompts[:1], N), bench_transformers(model, prompts, N)
    res.update(transformers_tokens_per_sec_batch1=t1, transformers_tokens_per_sec_batch32=t32,
               transformers_threads=[th1, th32], speedup_vs_transformers_batch1=tps1 / t1,
               speedup_vs_transformers_batch32=tps32 / t32, speedup_vs_transformers_batch32_int8=tps32_q8 / t32,
               transformers_logits_rel_err=float(np.abs(theirs - ours_logits).max() / np.abs(theirs).max()))
    del model
    save("transformers")

  try:
    import llama_cpp  # noqa: F401
  except ImportError:
    print("llama_cpp is not installed: llama.cpp keys stay null")
  else:
    if LLAMACPP.value and "decode" in SECTIONS.value:
      from internlm_jax.serve.bench_peers import bench_llamacpp
      with tempfile.TemporaryDirectory() as d:
        f32, th_f32, f32_tokens, f32_logits = bench_llamacpp(config, params, prompts[0], N, "f32", d)
        q80, th_q80, _, _ = bench_llamacpp(config, params, prompts[0], N, "q8_0", d)
      same = next((i for i, (a, b) in enumerate(zip(f32_tokens, ours_tokens[0])) if a != b), N)
      res.update(llamacpp_tokens_per_sec_batch1_f32=f32, llamacpp_tokens_per_sec_batch1_q8_0=q80,
                 vs_llamacpp_batch1=tps1 / f32, vs_llamacpp_batch1_int8_vs_q8_0=tps1_q8 / q80,
                 llamacpp_logits_rel_err=float(np.abs(f32_logits - ours_logits).max() / np.abs(f32_logits).max()),
                 llamacpp_greedy_tokens_equal=same, llamacpp_threads=[th_f32, th_q80])
      save("llama.cpp")

  if "load" not in SECTIONS.value:
    return _print_table(config, res)
  work = sharegpt_like(REQUESTS.value, rng, config.vocab_size)
  mean_out = float(np.mean([o for _, o in work]))
  engine, prefill_s = load_engine(config, params, work, SLOTS.value, S)
  # Capacity of full-batch serving: each request costs its prefill (one at a time, compute-bound) plus its share
  # of batch-32 decode steps. Prefill is most of it here (prompts are ~1.8x the outputs).
  capacity = 1.0 / (prefill_s + mean_out / tps32)
  rates = ([r * capacity for r in (0.5, 1.0, 2.0)] if RATES.value == "auto"
           else [float(r) for r in RATES.value.split(",")])
  print(f"load: prefill {prefill_s * 1e3:.0f} ms per request, capacity estimate {capacity:.2f} req/s, rates "
        f"{[round(r, 2) for r in rates]}", flush=True)
  runs = bench_load(engine, work, rates, S, rng)
  top = runs[-1]
  res.update(load_requests=len(work), load_prompt_mean=float(np.mean([len(p) for p, _ in work])),
             load_output_mean=mean_out, load_prefill_s_per_request=prefill_s, load_capacity_estimate=capacity,
             load=runs,
             continuous_vs_static=top["continuous"]["output_tokens_per_sec"] / top["static"]["output_tokens_per_sec"],
             static_over_continuous_ttft_p50=[r["static"]["ttft_p50_s"] / r["continuous"]["ttft_p50_s"] for r in runs])
  save("load")
  _print_table(config, res)


def _print_table(config, res):
  print(f"\n125M Llama shape ({config.num_params() / 1e6:.0f}M params), {res['machine']}")
  for name, key, unit in TABLE:
    print(f"  {name:<32} {'-' if res[key] is None else f'{res[key]:,.2f}{unit}'}")


if __name__ == "__main__":
  app.run(main)
