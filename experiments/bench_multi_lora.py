"""What serving several LoRA adapters beside one base costs (serve/adapters.py): decode throughput of a full batch
on the serving benchmark's ~125M model (random weights), in one run, against the same engine without adapters.

  python experiments/bench_multi_lora.py --out=/tmp/bench_multi_lora.json [--adapters=4 --rank=16 --slots=16]

Cases, every request greedy with `ignore_eos`, a 32-token prompt and `--new_tokens` outputs, all submitted at once
to the in-process Scheduler: the base engine (no adapters); the adapter engine with every request on the base
(what holding the adapters costs); and with the requests spread evenly over the adapters (batched LoRA). The
adapters target wqkv, wo, w1, w2 and w3 (XTuner's default), float32. A merged adapter (`--adapter`) serves at the
base's speed, so the base case is also the one-adapter-per-server alternative.
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

OUT = flags.DEFINE_string("out", None, "JSON results file")
ADAPTERS = flags.DEFINE_integer("adapters", 4, "adapters served")
RANK = flags.DEFINE_integer("rank", 16, "rank of each adapter")
SLOTS = flags.DEFINE_integer("slots", 16, "engine slots = requests per run")
NEW = flags.DEFINE_integer("new_tokens", 64, "decoded tokens per request")
REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per case (medians reported)")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from internlm_jax.config import get_preset
  from internlm_jax.lora import LoraConfig, init_lora
  from internlm_jax.model import init_params
  from internlm_jax.serve.engine import Engine, EngineConfig
  from internlm_jax.serve.sampling import SamplingParams
  from internlm_jax.serve.scheduler import Scheduler
  from internlm_jax.serve.testing import tiny_tokenizer

  config = get_preset("125m")  # bench_serve.py's shape
  params = init_params(config, jax.random.key(0))
  lcfg = LoraConfig(rank=RANK.value, alpha=2.0 * RANK.value, targets=("wqkv", "wo", "w1", "w2", "w3"))
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: init_lora(config, lcfg, jax.random.key(0)))
  adapters = [(lcfg, jax.tree.map(lambda x: jnp.asarray(0.01 * rng.standard_normal(x.shape), jnp.float32), shapes))
              for _ in range(ADAPTERS.value)]
  ec = EngineConfig(max_slots=SLOTS.value, max_seq_len=128, page_size=16, prefill_chunk=64, steps_per_call=8,
                    prefix_caching=False, min_decode_bucket=SLOTS.value)
  prompts = [rng.integers(3, config.vocab_size, 32).tolist() for _ in range(SLOTS.value)]

  tokenizer = tiny_tokenizer(tempfile.mkdtemp())  # ids past its vocabulary decode to nothing

  def run(engine, spread: bool) -> dict:
    sched = Scheduler(engine, tokenizer, max_queue=SLOTS.value).start()
    start = time.perf_counter()
    handles = [sched.submit(p, SamplingParams(max_tokens=NEW.value, temperature=0.0, ignore_eos=True,
                                              adapter=(1 + i % ADAPTERS.value) if spread else 0))
               for i, p in enumerate(prompts)]
    results = [h.result(timeout=1800) for h in handles]
    seconds = time.perf_counter() - start
    sched.stop()
    tokens = sum(len(r.token_ids) for r in results)
    return {"seconds": seconds, "tokens_per_sec": tokens / seconds}

  base = Engine(params, config, ec)
  multi = Engine(params, config, ec, adapters=adapters)
  cases = {"base_engine": (base, False), "adapters_held_base_requests": (multi, False),
           "adapters_spread": (multi, True)}
  for engine, spread in cases.values():  # compile
    run(engine, spread)
  res = {"adapters": ADAPTERS.value, "rank": RANK.value, "slots": SLOTS.value, "new_tokens": NEW.value}
  for name, (engine, spread) in cases.items():
    runs = [run(engine, spread) for _ in range(REPEATS.value)]
    res[name] = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
  ref = res["base_engine"]["tokens_per_sec"]
  print(f"| batch of {SLOTS.value}, {ADAPTERS.value} adapters r{RANK.value} | tok/s | vs base engine |\n|---|---|---|")
  for name in cases:
    res[f"{name}_vs_base"] = res[name]["tokens_per_sec"] / ref
    print(f"| {name} | {res[name]['tokens_per_sec']:.1f} | {res[f'{name}_vs_base']:.2f}x |")
  if OUT.value:
    with open(OUT.value, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  app.run(main)
