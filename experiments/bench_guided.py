"""What guided decoding (response_format, guided.py) costs: decode throughput of a full batch with none, one and
all of its requests guided, on the serving benchmark's ~125M model (random weights), in one run.

  python experiments/bench_guided.py --out=/tmp/bench_guided.json [--slots=16 --new_tokens=64]

Every request is greedy with `ignore_eos`, a 32-token prompt and `--new_tokens` outputs, all submitted at once to
the in-process Scheduler (no HTTP). A guided request follows the regex `[a-z ]{400}`, which no request completes
within its budget, so every run decodes the same number of tokens. While a guided request runs, each decode call
runs one step (its next mask depends on the token just sampled) instead of `--steps_per_call`: the table shows
what that and the host's mask computation cost the batch. The tokenizer is the small test one (its ~400 pieces
are what the grammar can choose from); the model's vocabulary stays 32000, so each mask is 1000 words a slot.
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

OUT = flags.DEFINE_string("out", None, "JSON results file")
SLOTS = flags.DEFINE_integer("slots", 16, "engine slots = requests per run")
NEW = flags.DEFINE_integer("new_tokens", 64, "decoded tokens per request")
STEPS = flags.DEFINE_integer("steps_per_call", 8, "engine decode steps per host round trip (unguided)")
REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per case (medians reported)")
REGEX = "[a-z ]{400}"


def main(argv):
  del argv
  import jax
  import numpy as np

  from internlm_jax.config import get_preset
  from internlm_jax.model import init_params
  from internlm_jax.serve import guided
  from internlm_jax.serve.engine import Engine, EngineConfig
  from internlm_jax.serve.sampling import SamplingParams
  from internlm_jax.serve.scheduler import Scheduler
  from internlm_jax.serve.testing import tiny_tokenizer

  config = get_preset("125m")  # bench_serve.py's shape
  params = init_params(config, jax.random.key(0))
  tokenizer = tiny_tokenizer(tempfile.mkdtemp())
  ec = EngineConfig(max_slots=SLOTS.value, max_seq_len=128, page_size=16, prefill_chunk=64,
                    steps_per_call=STEPS.value, prefix_caching=False, min_decode_bucket=SLOTS.value)
  engine = Engine(params, config, ec)
  grammar = guided.compile_response_format({"type": "regex_schema", "regex_schema": REGEX}, tokenizer,
                                           config.vocab_size)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, tokenizer.vocab_size, 32).tolist() for _ in range(SLOTS.value)]

  def run(num_guided: int) -> dict:
    sched = Scheduler(engine, tokenizer, max_queue=SLOTS.value).start()
    plain = SamplingParams(max_tokens=NEW.value, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    handles = [sched.submit(p, plain if i >= num_guided else SamplingParams(
        max_tokens=NEW.value, temperature=0.0, ignore_eos=True, grammar=grammar)) for i, p in enumerate(prompts)]
    results = [h.result(timeout=1800) for h in handles]
    seconds = time.perf_counter() - start
    sched.stop()
    tokens = sum(len(r.token_ids) for r in results)
    assert all(r.reason == "length" for r in results), [r.reason for r in results]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_sec": tokens / seconds,
            "generate_calls": sched.timings["generate_calls"], "dispatch_s": sched.timings["dispatch_s"]}

  run(0), run(1)  # compile every shape both kinds of call use
  cases = {"none": 0, "one": 1, "all": SLOTS.value}
  res = {"slots": SLOTS.value, "new_tokens": NEW.value, "steps_per_call": STEPS.value, "regex": REGEX}
  for name, k in cases.items():
    runs = [run(k) for _ in range(REPEATS.value)]
    res[name] = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    print(f"{name:>5} guided: {res[name]['tokens_per_sec']:.1f} tok/s, {res[name]['generate_calls']:.0f} calls, "
          f"dispatch (host, masks included) {res[name]['dispatch_s']:.2f} s of {res[name]['seconds']:.2f} s")
  base = res["none"]["tokens_per_sec"]
  res["one_guided_vs_none"] = res["one"]["tokens_per_sec"] / base
  res["all_guided_vs_none"] = res["all"]["tokens_per_sec"] / base
  print(f"| batch of {SLOTS.value} | tok/s | vs unguided |\n|---|---|---|")
  for name in cases:
    print(f"| {name} guided | {res[name]['tokens_per_sec']:.1f} | {res[name]['tokens_per_sec'] / base:.2f}x |")
  if OUT.value:
    with open(OUT.value, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  app.run(main)
