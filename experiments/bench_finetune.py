"""Peak memory and step time of full fine-tuning, LoRA and QLoRA on one model config, measured in one run.

  python experiments/bench_finetune.py --out=/tmp/bench_finetune.json            # ~300M params, seq 512, batch 1
  python experiments/bench_finetune.py --out=/tmp/b.json --preset=small --seq_len=256 --rank=16   # quick, CPU

Memory is XLA's own account of each compiled step (`compiled.memory_analysis()`): arguments (weights, optimizer
state, batch) + temporaries (activations, gradients, per-layer merged or dequantized weights) + outputs not
aliased to donated inputs; it is what the step needs resident, independent of allocator behaviour. Per method:
  full   float32 master weights + AdamW moments, the pretraining step (train.step.make_train_step)
  lora   frozen base in --base_dtype (bfloat16), float32 adapters + moments (train.finetune_step)
  qlora  frozen base NF4 (block 64), scales double-quantized to int8 (--double_quant, XTuner's default), born
         quantized layer by layer (quant_nf4.init_quantized_params: the float base never exists); by default the
         embedding and output head too (--qlora_targets), which the loss reads row by row and one vocabulary chunk
         at a time (train.finetune_step.base_cross_entropy_sums). --qlora_ranks adds runs at other ranks
         (qlora_r16 ...): XTuner's r64 on a 7B model (hidden 4096) is r16 here by adapter share r / hidden.
--moments=int8 measures every method with 8-bit AdamW moments instead (train/adam8bit.py; OptimizerConfig.moments),
named with an `_adam8bit` suffix (qlora_adam8bit_bytes_per_param, ...); --moments=float32,int8 measures both.
Remat is --remat_policy for every method (default full_split: only block inputs saved, and the backward
recomputes a block's attention and MLP halves separately, so one's activations are not live during the other's
backward). Attention is --attention_impl with --attention_block_size for every method (default blockwise, 128: memory O(T),
as the flash / SDPA attention XTuner runs with; "xla" materializes [B, H, T, T] scores).
Bytes per parameter divide by the base model's parameter count. Times are medians of --steps steps after two
warm-up steps; `base_fwd_bwd` is the forward + backward (all weight gradients, no optimizer) of the lora base, the
bar the issue sets for a LoRA step (lora_step_vs_base <= 1.1).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from internlm_jax import host_memory  # noqa: E402

OUT = flags.DEFINE_string("out", None, "JSON results file")
PRESET = flags.DEFINE_string("preset", "bench-300m", "ModelConfig preset, or bench-300m (InternLM2 vocab, "
                             "hidden 1024, 12 layers: about 330M params)")
SEQ = flags.DEFINE_integer("seq_len", 512, "sequence length")
BATCH = flags.DEFINE_integer("batch", 1, "batch size")
STEPS = flags.DEFINE_integer("steps", 5, "timed steps (after 2 warm-up steps)")
REMAT = flags.DEFINE_string("remat_policy", "full_split", "remat policy, the same for every method (full_split: "
                            "full, with the block's attention and MLP halves checkpointed again; model.py)")
DTYPE = flags.DEFINE_string("dtype", "", "compute dtype; default bfloat16 on accelerators, float32 on CPU")
BASE_DTYPE = flags.DEFINE_string("base_dtype", "bfloat16", "storage dtype of the frozen LoRA base")
RANK = flags.DEFINE_integer("rank", 64, "LoRA rank (XTuner's default 64, alpha 16)")
TARGETS = flags.DEFINE_list("targets", ["wqkv", "wo", "w1", "w2", "w3"], "LoRA target modules (XTuner's default: "
                            "every Linear but the output head)")
QLORA_TARGETS = flags.DEFINE_list("qlora_targets", ["embed", "wqkv", "wo", "w1", "w2", "w3", "output"],
                                  "QLoRA: weights stored as NF4 (the embedding and head are 57% of bench-300m)")
METHODS = flags.DEFINE_list("methods", ["full", "lora", "qlora"], "methods to measure")
DOUBLE_QUANT = flags.DEFINE_bool("double_quant", True, "QLoRA: int8 NF4 scales with a float32 step per 256 blocks")
QLORA_RANKS = flags.DEFINE_list("qlora_ranks", ["16"], "QLoRA: extra ranks measured besides --rank (as qlora_rN)")
MOMENTS = flags.DEFINE_list("moments", ["float32"], "AdamW moments to measure each method with: float32 (the "
                            "plain names) and/or int8 (8-bit block-wise, names suffixed _adam8bit)")
ATTENTION = flags.DEFINE_string("attention_impl", "blockwise", "attention for every method (model.attention_impl)")
ATTENTION_BLOCK = flags.DEFINE_integer("attention_block_size", 128, "kv block of blockwise attention")
MEMORY_SCHEDULER = flags.DEFINE_bool("memory_scheduler", True, "XLA:CPU: order each step's instructions for "
                                     "least memory (appends --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED to "
                                     "XLA_FLAGS; the same numbers, bitwise)")
MEMORY_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def _config():
  from internlm_jax.config import ModelConfig, get_preset
  if PRESET.value == "bench-300m":
    config = ModelConfig(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=8, head_dim=64,
                         intermediate_size=2816, max_position_embeddings=4096)
  else:
    config = get_preset(PRESET.value)
  import jax
  dtype = DTYPE.value or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  return config.replace(dtype=dtype, remat_policy=REMAT.value, attention_impl=ATTENTION.value,
                        attention_block_size=ATTENTION_BLOCK.value)


def _batch(config):
  import jax.numpy as jnp
  import numpy as np
  batch, seq = BATCH.value, SEQ.value
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, (batch, seq + 1)).astype(np.int32)
  rows = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)), "loss_mask": np.ones((batch, seq), np.int32)}
  return {k: jnp.asarray(v) for k, v in rows.items()}


def _memory(jitted, *args) -> dict:
  """XLA's byte counts for the compiled call; peak = arguments + temporaries + outputs that are not aliased."""
  stats = jitted.lower(*args).compile().memory_analysis()
  out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "temp", "output", "alias")}
  out["peak"] = out["argument"] + out["temp"] + max(0, out["output"] - out["alias"])
  return out


def _median_seconds(call, steps: int) -> float:
  import jax
  from internlm_jax.train.metrics import median_seconds
  return median_seconds(lambda: jax.block_until_ready(call()), steps, warmup=2)


def measure(method: str, config, batch, rank: int, moments: str = "float32", base_bar: bool = True) -> dict:
  import jax
  import jax.numpy as jnp
  from internlm_jax.lora import LoraConfig, init_lora
  from internlm_jax.model import init_params
  from internlm_jax.quant_nf4 import init_quantized_params
  from internlm_jax.train import finetune_step
  from internlm_jax.train.optimizer import OptimizerConfig, make_optimizer
  from internlm_jax.train.state import TrainState
  from internlm_jax.train.step import make_train_step
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=1000, weight_decay=0.0,
                                      moments=moments))
  key = jax.random.key(0)
  if method == "full":
    params = init_params(config.replace(param_dtype="float32"), key)
    state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                         rng=jax.random.key_data(key), skipped=jnp.zeros((), jnp.int32)),
                    donate_argnums=0)(params)
    step = make_train_step(config, tx)
    memory = _memory(step, state, batch)
    holder = [state]

    def call():
      holder[0], metrics = step(holder[0], batch)
      return metrics["loss"]
    return {"memory": memory, "step_seconds": _median_seconds(call, STEPS.value), "trainable": config.num_params()}

  base_config = config.replace(param_dtype=BASE_DTYPE.value)
  if method == "qlora":
    base = init_quantized_params(base_config, key, "nf4", targets=QLORA_TARGETS.value,
                                 double_quant=DOUBLE_QUANT.value)
  else:
    base = init_params(base_config, key)
  lcfg = LoraConfig(rank=rank, alpha=16.0, targets=tuple(TARGETS.value))
  adapters = init_lora(base_config, lcfg, jax.random.key(1))
  state = finetune_step.create_adapter_state(adapters, tx)
  step = finetune_step.make_finetune_step(base_config, lcfg, tx)
  memory = _memory(step, state, base, batch)
  holder = [state]

  def call():
    holder[0], metrics = step(holder[0], base, batch)
    return metrics["loss"]
  result = {"memory": memory, "step_seconds": _median_seconds(call, STEPS.value),
            "trainable": sum(x.size for x in jax.tree.leaves(adapters))}
  if method == "lora" and base_bar:
    from internlm_jax.train.step import cross_entropy_sums
    grad = jax.jit(jax.grad(lambda p, b: cross_entropy_sums(p, b, base_config)[0]))
    result["base_fwd_bwd_memory"] = _memory(grad, base, batch)
    result["base_fwd_bwd_seconds"] = _median_seconds(lambda: grad(base, batch), STEPS.value)
  return result


def main(argv):
  host_memory.reuse_freed_memory()  # before the first computation (internlm_jax/host_memory.py)
  del argv
  if MEMORY_SCHEDULER.value and MEMORY_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    # XLA:CPU's default scheduler favours concurrency and kept ~26 MiB more live at the QLoRA peak (and ~0.9 GB
    # in full fine-tuning); it reads XLA_FLAGS when the backend starts, so this precedes the first computation.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + MEMORY_SCHEDULER_FLAG).strip()
  import jax
  config = _config()
  batch = _batch(config)
  n = config.num_params()
  if not MOMENTS.value or not set(MOMENTS.value) <= {"float32", "int8"}:
    raise app.UsageError(f"--moments must list float32 and/or int8, got {MOMENTS.value}")
  runs = [(m, m, RANK.value) for m in METHODS.value]
  if "qlora" in METHODS.value:
    runs += [(f"qlora_r{r}", "qlora", int(r)) for r in QLORA_RANKS.value if int(r) != RANK.value]
  suffix = {"float32": "", "int8": "_adam8bit"}
  runs = [(name + suffix[mo], m, rank, mo) for mo in MOMENTS.value for name, m, rank in runs]
  # The base forward + backward bar is measured once, with the first LoRA run.
  bar = next((name for name, m, _, _ in runs if m == "lora"), None)
  results = {name: dict(measure(m, config, batch, rank, mo, base_bar=name == bar), rank=rank, moments=mo)
             for name, m, rank, mo in runs}
  out = {"machine": jax.devices()[0].device_kind, "backend": jax.default_backend(), "preset": PRESET.value,
         "params": n, "seq_len": SEQ.value, "batch": BATCH.value, "dtype": config.dtype,
         "base_dtype": BASE_DTYPE.value, "remat_policy": REMAT.value, "rank": RANK.value,
         "targets": TARGETS.value, "qlora_targets": QLORA_TARGETS.value, "double_quant": DOUBLE_QUANT.value,
         "attention_impl": ATTENTION.value, "attention_block_size": ATTENTION_BLOCK.value,
         "moments": MOMENTS.value, "xla_flags": os.environ.get("XLA_FLAGS", ""), "methods": results}
  for m, r in results.items():
    out[f"{m}_bytes_per_param"] = r["memory"]["peak"] / n
    out[f"{m}_step_seconds"] = r["step_seconds"]
  if bar is not None:  # "lora", or "lora_adam8bit" when only int8 moments were asked for
    out["base_fwd_bwd_seconds"] = results[bar]["base_fwd_bwd_seconds"]
    out[f"{bar}_step_vs_base"] = results[bar]["step_seconds"] / out["base_fwd_bwd_seconds"]
  ref = results.get("full") or results.get("full_adam8bit")
  print(f"\n{PRESET.value} ({n / 1e6:.1f}M params), batch {BATCH.value} x seq {SEQ.value}, {config.dtype} compute, "
        f"remat {REMAT.value}, attention {ATTENTION.value}/{ATTENTION_BLOCK.value}, {out['machine']}")
  width = max(10, max(len(m) for m in results) + 2)
  print(f"  {'method':<{width}}{'peak MiB':>10}{'B/param':>9}{'args MiB':>10}{'temp MiB':>10}{'step s':>9}"
        f"{'mem vs full':>12}{'time vs full':>13}{'trainable':>12}")
  for m, r in results.items():
    mem, t = r["memory"], r["step_seconds"]
    rel_mem = f"{mem['peak'] / ref['memory']['peak']:.2f}x" if ref else "-"
    rel_t = f"{t / ref['step_seconds']:.2f}x" if ref else "-"
    print(f"  {m:<{width}}{mem['peak'] / 2**20:>10.1f}{mem['peak'] / n:>9.2f}{mem['argument'] / 2**20:>10.1f}"
          f"{mem['temp'] / 2**20:>10.1f}{t:>9.3f}{rel_mem:>12}{rel_t:>13}{r['trainable']:>12,}")
  if bar is not None:
    print(f"  {bar} step / base forward+backward: {out[f'{bar}_step_vs_base']:.2f}x "
          f"({out['base_fwd_bwd_seconds']:.3f} s)")
  for m, r in results.items():
    if m.startswith("qlora"):
      verdict = "meets" if r["memory"]["peak"] / n <= 1.1 else "misses"
      print(f"  {m} (rank {r['rank']}): {r['memory']['peak'] / n:.3f} bytes/param, {verdict} the <= 1.1 target")
  if OUT.value:
    with open(OUT.value, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
