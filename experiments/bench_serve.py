"""Serving benchmark on a ~125M Llama-shaped InternLM2 (random weights): decode speed against the machine's
bandwidth and two peers, and continuous vs static batching under Poisson load.

  python experiments/bench_serve.py --out=/tmp/bench_serve.json [--requests=200 --rates=auto --sections=decode,load]
  python experiments/bench_serve.py --sections=load --rates=2,4 --out=a.json; ... --rates=6,inf --merge_load=a.json
  python experiments/bench_serve.py --sections=quality --checkpoint=TRAINED_DIR --out=q.json

One run measures: (a) our Engine's decode tokens/s at batch 1 and 32 (greedy, after the prompt), with
memory-bandwidth utilisation against the bandwidth a jitted matvec over a weight-sized array reaches (the read
pattern of a batch-1 decode step); float32 and int8 weights (int8: the native FFI kernel when it builds, see
native/qmatmul.py; INTERNLM_JAX_NATIVE=0 times the pure-JAX path). (b) transformers' LlamaForCausalLM.generate
on the same weights (PyTorch CPU), same prompts and lengths, in float32 and with PyTorch dynamic int8 Linear
layers (per-channel weights: the int8 peer of our int8 engine, bench_peers.quantize_int8). (c) the Scheduler
in-process under Poisson arrivals of requests with a ShareGPT-like (log-normal) spread of prompt and output
lengths, against static batching (batches
formed from what is waiting, run until their longest member ends) on the same engine and trace; the ratio is
throughput at a p99 TTFT objective (internlm_jax/serve/bench_load.py says how). (d) llama.cpp
(llama-cpp-python) decoding the same weights exported to GGUF (f32 and q8_0) at batch 1. Peers that are not
installed leave their keys null. Prints a ratio table and writes JSON. `quality` (not by default: it needs a
trained checkpoint) reports the validation-perplexity change of int8 and int4 weights and the int8 and int4 KV caches.
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

OUT = flags.DEFINE_string("out", None, "JSON results file")
PROMPT = flags.DEFINE_integer("prompt_len", 32, "prompt tokens for the decode benchmarks")
NEW = flags.DEFINE_integer("new_tokens", 64, "decoded tokens per sequence for the decode benchmarks")
STEPS = flags.DEFINE_integer("steps_per_call", 8, "engine decode steps per host round trip")
REQUESTS = flags.DEFINE_integer("requests", 200, "requests per load run")
RATES = flags.DEFINE_string("rates", "auto", "arrival rates (req/s, inf: all at once), comma separated; auto: 0.5, "
                            "1 and 2 times the capacity of static batching (one full batch of the trace, timed)")
SLOTS = flags.DEFINE_integer("slots", 32, "engine slots (the max batch of both systems) for the load runs")
SLO = flags.DEFINE_float("slo_ttft_p99_s", 20.0, "load: the p99 time-to-first-token objective of continuous_vs_static")
STATIC_WAIT = flags.DEFINE_float("static_wait_s", 0.0, "load: how long static batching waits for a batch to fill")
MIN_BUCKET = flags.DEFINE_integer("min_decode_bucket", 8, "load: the engine's smallest decode bucket (= --slots: "
                                  "no buckets, every decode call runs all slots)")
LOAD_QUANT = flags.DEFINE_enum("load_quant", "none", ["none", "int8"], "load: weights of both systems' engine "
                                "(int8: per-channel, the native kernels on CPU)")
STATIC = flags.DEFINE_enum("static", "skip_finished", ["skip_finished", "rows_to_longest"], "load: the static "
                           "baseline: finished rows leave the batch (the stronger one), or every row decodes until the "
                           "batch's longest ends (HF generate's / FasterTransformer's batching; bench_load.py)")
HANDOFF = flags.DEFINE_bool("handoff", True, "load: the continuous scheduler ends a decode call when a slot frees "
                            "while requests wait (false: every call runs --steps_per_call steps)")
MERGE = flags.DEFINE_list("merge_load", [], "load: JSON outputs of earlier runs (same seed and requests) whose rates "
                          "join this run's before the ratio is computed")
TORCH = flags.DEFINE_bool("torch", True, "time transformers generate")
LLAMACPP = flags.DEFINE_bool("llamacpp", True, "time llama.cpp (if llama_cpp is installed)")
SEED = flags.DEFINE_integer("seed", 0, "weights, prompts and arrival trace")
SECTIONS = flags.DEFINE_list("sections", ["decode", "load"], "decode: (a) ours, with (b) and (d) per --torch and "
                             "--llamacpp; load: (c); quality: --checkpoint's validation perplexity under each "
                             "quantization")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "quality: a trained checkpoint (HF folder, params folder or "
                                 "training workdir) with its tokenizer.model, e.g. a Shakespeare pretraining run")
WINDOWS = flags.DEFINE_integer("quality_windows", 16, "quality: windows of --quality_len validation tokens scored")
WINDOW_LEN = flags.DEFINE_integer("quality_len", 256, "quality: tokens per scored window (<s> included)")


def bench_config():
  from internlm_jax.config import get_preset
  return get_preset("125m")


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
# ---- main ---------------------------------------------------------------------------------------------------
TABLE = [("bandwidth (best of matvec/sum)", "bandwidth_gbps", " GB/s"),
         ("ours batch 1", "decode_tokens_per_sec_batch1", " tok/s"), ("  MBU batch 1", "mbu_batch1", ""),
         ("ours batch 1 int8", "decode_tokens_per_sec_batch1_int8", " tok/s"),
         ("ours batch 32", "decode_tokens_per_sec_batch32", " tok/s"),
         ("ours batch 32 int8", "decode_tokens_per_sec_batch32_int8", " tok/s"),
         ("  ours int8 logits rel err vs f32", "int8_logits_rel_err", ""),
         ("transformers batch 1", "transformers_tokens_per_sec_batch1", " tok/s"),
         ("transformers batch 32", "transformers_tokens_per_sec_batch32", " tok/s"),
         ("transformers int8 batch 1", "transformers_int8_tokens_per_sec_batch1", " tok/s"),
         ("transformers int8 batch 32", "transformers_int8_tokens_per_sec_batch32", " tok/s"),
         ("  torch int8 logits rel err vs f32", "transformers_int8_logits_rel_err", ""),
         ("llama.cpp f32 batch 1", "llamacpp_tokens_per_sec_batch1_f32", " tok/s"),
         ("llama.cpp q8_0 batch 1", "llamacpp_tokens_per_sec_batch1_q8_0", " tok/s"),
         ("ours / llama.cpp f32, b1", "vs_llamacpp_batch1", "x"),
         ("ours int8 / llama.cpp q8_0, b1", "vs_llamacpp_batch1_int8_vs_q8_0", "x"),
         ("ours / transformers, b32", "speedup_vs_transformers_batch32", "x"),
         ("ours int8 / transformers f32, b32", "speedup_vs_transformers_batch32_int8", "x"),
         ("ours int8 / transformers int8, b1", "speedup_vs_transformers_int8_batch1", "x"),
         ("ours int8 / transformers int8, b32", "speedup_vs_transformers_int8_batch32", "x"),
         ("continuous / static at the SLO", "continuous_vs_static", "x output tok/s"),
         ("continuous / static saturated", "continuous_vs_static_saturated", "x output tok/s")]


def main(argv):
  del argv
  import jax
  import numpy as np
  from internlm_jax import quant
  from internlm_jax.model import init_params
  from internlm_jax.native import qmatmul
  from internlm_jax.serve import paged_model
  config = bench_config()
  rng = np.random.default_rng(SEED.value)
  P, N, S = PROMPT.value, NEW.value, STEPS.value
  prompts = rng.integers(3, config.vocab_size, (32, P)).tolist()
  res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores",
         "backend": jax.default_backend(),
         "params": config.num_params(), "prompt_len": P, "new_tokens": N, "steps_per_call": S}
  for key in ("transformers_tokens_per_sec_batch1", "transformers_tokens_per_sec_batch32",
              "speedup_vs_transformers_batch32", "speedup_vs_transformers_batch32_int8",
              "transformers_int8_tokens_per_sec_batch1", "transformers_int8_tokens_per_sec_batch32",
              "speedup_vs_transformers_int8_batch1", "speedup_vs_transformers_int8_batch32",
              "transformers_int8_logits_rel_err", "transformers_int8_error",
              "llamacpp_tokens_per_sec_batch1_f32",
              "llamacpp_tokens_per_sec_batch1_q8_0", "vs_llamacpp_batch1", "vs_llamacpp_batch1_int8_vs_q8_0",
              "continuous_vs_static", "continuous_vs_static_saturated"):
    res[key] = None

  def save(section):  # after every section, so a run cut short still leaves its numbers
    print(section, {k: v for k, v in res.items() if not isinstance(v, (list, dict))}, flush=True)
    if OUT.value:
      with open(OUT.value, "w") as f:
        json.dump(res, f, indent=2)

  if "quality" in SECTIONS.value:
    res.update(quality_perplexity(CHECKPOINT.value, WINDOWS.value, WINDOW_LEN.value))
    save("quality")
    if SECTIONS.value == ["quality"]:
      return
  params = init_params(config, jax.random.key(SEED.value))
  if "decode" not in SECTIONS.value:
    return _load_section(config, params, rng, res, save)
  bw = measure_bandwidth(quant.nbytes(params) - quant.nbytes(params["embed"]))
  tps1, ours_tokens, ours_logits = bench_engine(config, params, prompts[:1], N, S)
  tps32, _, _ = bench_engine(config, params, prompts, N, S)
  q8 = quant.quantize_params(params, "int8")
  tps1_q8, _, ours_q8_logits = bench_engine(config, q8, prompts[:1], N, S)
  tps32_q8, _, _ = bench_engine(config, q8, prompts, N, S)
  peak = max(bw.values()) * 1e9
  res.update(bandwidth_gbps=peak / 1e9, bandwidth_detail=bw, decode_tokens_per_sec_batch1=tps1,
             decode_tokens_per_sec_batch32=tps32, decode_tokens_per_sec_batch1_int8=tps1_q8,
             decode_tokens_per_sec_batch32_int8=tps32_q8, native_int8=paged_model.native_int8(q8, config),
             native_vnni_min_rows=qmatmul.vnni_min_rows(),
             mbu_batch1=decode_bytes(config, params, 1, P + N // 2) * tps1 / peak,
             mbu_batch1_int8=decode_bytes(config, q8, 1, P + N // 2) * tps1_q8 / peak,
             mbu_batch32=decode_bytes(config, params, 32, P + N // 2) * tps32 / 32 / peak,
             int8_logits_rel_err=_rel_err(ours_q8_logits, ours_logits))
  save("ours")

  if TORCH.value and "decode" in SECTIONS.value:
    import torch
    from internlm_jax.serve.bench_peers import bench_transformers, llama_model
    model = llama_model(config, params)
    with torch.no_grad():
      theirs = model(input_ids=torch.tensor(prompts[:1], device=model.device)).logits[0, -1].float().cpu().numpy()
    (t1, th1), (t32, th32) = bench_transformers(model, prompts[:1], N), bench_transformers(model, prompts, N)
    res.update(transformers_tokens_per_sec_batch1=t1, transformers_tokens_per_sec_batch32=t32,
               transformers_threads=[th1, th32], speedup_vs_transformers_batch1=tps1 / t1,
               speedup_vs_transformers_batch32=tps32 / t32, speedup_vs_transformers_batch32_int8=tps32_q8 / t32,
               transformers_logits_rel_err=_rel_err(ours_logits, theirs))
    save("transformers")
    res.update(_transformers_int8(model, prompts, N, theirs, tps1_q8, tps32_q8))
    del model
    save("transformers int8")

  try:
    import llama_cpp  # noqa: F401
  except ImportError:
    print("llama_cpp is not installed: llama.cpp keys stay null")
  else:
    if LLAMACPP.value and "decode" in SECTIONS.value:
      from internlm_jax.serve.bench_peers import bench_llamacpp
      with tempfile.TemporaryDirectory() as d:
        f32, th_f32, f32_tokens, f32_logits, bufts_f32 = bench_llamacpp(config, params, prompts[0], N, "f32", d)
        q80, th_q80, _, _, bufts_q80 = bench_llamacpp(config, params, prompts[0], N, "q8_0", d)
      same = next((i for i, (a, b) in enumerate(zip(f32_tokens, ours_tokens[0])) if a != b), N)
      res.update(llamacpp_tokens_per_sec_batch1_f32=f32, llamacpp_tokens_per_sec_batch1_q8_0=q80,
                 vs_llamacpp_batch1=tps1 / f32, vs_llamacpp_batch1_int8_vs_q8_0=tps1_q8 / q80,
                 llamacpp_logits_rel_err=float(np.abs(f32_logits - ours_logits).max() / np.abs(f32_logits).max()),
                 llamacpp_greedy_tokens_equal=same, llamacpp_threads=[th_f32, th_q80],
                 llamacpp_extra_bufts=[bufts_f32, bufts_q80])
      save("llama.cpp")

  if "load" not in SECTIONS.value:
    return _print_table(config, res)
  _load_section(config, params, rng, res, save)


def quality_perplexity(checkpoint, windows: int, length: int) -> dict:
  """Held-out Shakespeare perplexity of `checkpoint` through the serving engine for float32 weights, int8
  (per channel; the native kernel where it builds), int4 (group-wise) weights and the int8 and int4 KV caches.
  Teacher forced: a prefill with prompt logprobs, whose attention reads the keys and values back from the pages,
  so a quantized cache is scored as decoding reads it."""
  import numpy as np
  from internlm_jax.data import corpus
  from internlm_jax.quant import quantize_params
  from internlm_jax.serve import loading
  from internlm_jax.serve.engine import Engine, EngineConfig
  if not checkpoint:
    raise app.UsageError("--sections=quality needs --checkpoint=DIR")
  tok = loading.find_tokenizer(checkpoint, None)
  config, params = loading.load_model(checkpoint)
  source, ids = corpus.shakespeare_source("validation"), []
  for i in range(len(source)):  # the documents run together; each window is one prompt starting with <s>
    ids += tok.encode(source[i])
    if len(ids) >= windows * (length - 1):
      break
  chunks = [[tok.bos_id] + ids[w * (length - 1):(w + 1) * (length - 1)] for w in range(windows)]
  chunks = [c for c in chunks if len(c) == length]
  variants = {"float32": (params, None), "int8": (quantize_params(params, "int8"), None),
              "int4": (quantize_params(params, "int4"), None), "int8_kv": (params, "int8"),
              "int4_kv": (params, "int4")}
  out = {}
  for name, (p, kv_dtype) in variants.items():
    engine = Engine(p, config, EngineConfig(max_slots=1, max_seq_len=length + 16, page_size=16,
                                            prefill_chunk=256, prefix_caching=False, kv_dtype=kv_dtype))
    state, logprobs = engine.init_state(), []
    for chunk in chunks:
      state, prefix = engine.prefill(state, chunk, prompt_logprobs=0)
      logprobs += [lp for lp, _, _ in prefix.prompt_logprobs]
      engine.release(prefix)
    out[name] = float(np.exp(-np.mean(logprobs)))
    print(f"quality {name}: perplexity {out[name]:.4f} over {len(logprobs)} tokens", flush=True)
  return {"quality_checkpoint": os.path.abspath(checkpoint), "quality_params": config.num_params(),
          "quality_tokens": len(chunks) * (length - 1),
          "perplexity": out, "perplexity_change": {k: v / out["float32"] - 1 for k, v in out.items()
                                                   if k != "float32"}}


def _rel_err(logits, reference) -> float:
  import numpy as np
  return float(np.abs(logits - reference).max() / np.abs(reference).max())


def _transformers_int8(model, prompts, new_tokens, f32_logits, tps1_q8, tps32_q8) -> dict:
  """(b) again with the float32 model's Linear layers quantized in place to PyTorch dynamic int8 (per channel),
  timed like the float32 peer; its first-step logits against the float32 peer's show a broken quantization. A
  torch build without dynamic quantization leaves the keys null and says why in transformers_int8_error."""
  import torch
  from internlm_jax.serve.bench_peers import bench_transformers, quantize_int8
  if model.device.type != "cpu":
    return {"transformers_int8_error": "torch.ao dynamic int8 Linear runs on the CPU only"}
  try:
    model, scheme = quantize_int8(model)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(prompts[:1])).logits[0, -1].numpy()
    t1, th1 = bench_transformers(model, prompts[:1], new_tokens)
    t32, th32 = bench_transformers(model, prompts, new_tokens)
  except Exception as e:  # noqa: BLE001 -- reported, not fatal: the other peers still run
    print(f"transformers int8 failed: {type(e).__name__}: {e}", flush=True)
    return {"transformers_int8_error": f"{type(e).__name__}: {e}"}
  return {"transformers_int8_tokens_per_sec_batch1": t1, "transformers_int8_tokens_per_sec_batch32": t32,
          "transformers_int8_threads": [th1, th32], "transformers_int8_scheme": scheme,
          "transformers_int8_logits_rel_err": _rel_err(logits, f32_logits),
          "speedup_vs_transformers_int8_batch1": tps1_q8 / t1, "speedup_vs_transformers_int8_batch32": tps32_q8 / t32}


def _load_section(config, params, rng, res, save):
  """(c): both batchers at each rate (plus the rates of --merge_load files), then the ratios."""
  import numpy as np
  from internlm_jax.serve import bench_load as bl
  from internlm_jax.serve.testing import tiny_tokenizer
  work = bl.sharegpt_like(REQUESTS.value, rng, config.vocab_size)
  if LOAD_QUANT.value != "none":
    from internlm_jax.quant import quantize_params
    params = quantize_params(params, LOAD_QUANT.value)
  engine, capacity = bl.load_engine(config, params, work, SLOTS.value, STEPS.value, MIN_BUCKET.value)
  rates = ([r * capacity for r in (0.5, 1.0, 2.0)] if RATES.value == "auto"
           else [float(r) for r in RATES.value.split(",")])
  print(f"load: static capacity estimate {capacity:.2f} req/s, rates {[round(r, 2) for r in rates]}", flush=True)
  tokenizer = tiny_tokenizer(tempfile.mkdtemp())  # output ids past its vocabulary decode to nothing
  runs = bl.bench_load(engine, tokenizer, work, rates, SEED.value, STATIC_WAIT.value,
                       log=lambda line: print(line, flush=True), handoff=HANDOFF.value,
                       static_rows_to_longest=STATIC.value == "rows_to_longest")
  for path in MERGE.value:
    with open(path) as f:
      earlier = json.load(f)
    assert earlier["load_requests"] == len(work), f"{path}: another trace"
    assert earlier.get("load_quant", "none") == LOAD_QUANT.value, f"{path}: other weights"
    assert earlier.get("load_handoff", False) == HANDOFF.value, f"{path}: another continuous scheduler"
    assert earlier.get("load_static", "skip_finished") == STATIC.value, f"{path}: another static baseline"
    runs += earlier.get("load_raw", earlier["load"])
  raw, runs = runs, bl.median_by_rate(runs)  # rates run more than once count by their medians
  ratios = bl.continuous_vs_static(runs, SLO.value)
  res.update(load_requests=len(work), load_prompt_mean=float(np.mean([len(p) for p, _ in work])),
             load_output_mean=float(np.mean([o for _, o in work])), load_slots=SLOTS.value,
             load_min_decode_bucket=MIN_BUCKET.value, load_quant=LOAD_QUANT.value, load_handoff=HANDOFF.value,
             load_static=STATIC.value, load_static_wait_s=STATIC_WAIT.value, load_static_capacity_estimate=capacity,
             load=runs, load_raw=raw,
             **ratios)
  save("load")
  _print_table(config, res)


def _print_table(config, res):
  print(f"\n125M Llama shape ({config.num_params() / 1e6:.0f}M params), {res['machine']}")
  for name, key, unit in TABLE:
    value = res.get(key)
    text = "-" if value is None else f"{value:.2g}{unit}" if key.endswith("_err") else f"{value:,.2f}{unit}"
    print(f"  {name:<36} {text}")
  if res.get("transformers_int8_error"):
    print(f"  transformers int8 failed: {res['transformers_int8_error']}")


if __name__ == "__main__":
  app.run(main)
