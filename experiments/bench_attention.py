"""Attention benchmarks: blockwise vs xla on CPU; Pallas flash / paged decode vs XLA, cuDNN and copy bandwidth on GPU.

  python experiments/bench_attention.py --out=/tmp/bench_attention.json [--seq_lens=2048,4096,8192]

Shapes: B batch, T sequence, K kv heads, G query heads per kv head, D head_dim (InternLM2 uses K=8, D=128).
CPU rows: forward time of one attention call and XLA's compiled temp memory (the peak scratch beyond inputs and
outputs) for the forward and for forward+backward. The xla reference is timed only where its temp memory fits
--cpu_mem_budget_gb; above that the row keeps the compiled size and says it was skipped.
GPU rows (only when jax.default_backend() == "gpu"): causal TFLOP/s of the Pallas kernel and of
jax.nn.dot_product_attention (implementation "xla" and "cudnn"), forward and forward+backward, with B = tokens / T;
then the paged decode kernel's achieved read bandwidth against a measured device copy bandwidth.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

OUT = flags.DEFINE_string("out", None, "JSON results file")
SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "4096", "8192", "16384", "32768"], "sequence lengths")
CPU_HEADS = flags.DEFINE_string("cpu_heads", "1,2,2,64", "B,K,G,D for the CPU rows")
GPU_HEADS = flags.DEFINE_string("gpu_heads", "8,4,128", "K,G,D for the GPU rows (InternLM2-7B: 8 kv x 4, d 128)")
GPU_TOKENS = flags.DEFINE_integer("gpu_tokens", 32768, "tokens per GPU call: B = gpu_tokens // T")
CPU_BUDGET = flags.DEFINE_float("cpu_mem_budget_gb", 8.0, "skip timing xla on CPU above this temp memory")
BLOCK = flags.DEFINE_integer("block_size", 512, "blockwise tile")
REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per row (after one warm-up)")
DECODE = flags.DEFINE_string("decode", "64,4096,64", "batch,context,page_size of the GPU decode rows")
BLOCK_SWEEP = flags.DEFINE_list("gpu_block_sweep", [], "GPU: Pallas BlockSizes to time at the first seq_len, "
                                 "each 'block_q/block_k/block_q_bwd/block_k_bwd' (e.g. 128/64/64/64)")
COPY_MIB = flags.DEFINE_integer("copy_mib", 1024, "array size of the copy-bandwidth measurement")


def median_time(fn, repeats):
  from internlm_jax.train.metrics import median_seconds
  return median_seconds(fn, repeats, warmup=1)


def causal_flops(B, T, H, D):
  return 4 * B * T * T * H * D / 2  # QK^T and PV, the causal half


# ---- CPU: blockwise vs xla ----------------------------------------------------------------------------------------
def cpu_rows(seq_lens):
  import jax
  import jax.numpy as jnp
  from internlm_jax.attention import xla_attention
  from internlm_jax.attention_blockwise import blockwise_attention
  B, K, G, D = (int(x) for x in CPU_HEADS.value.split(","))
  impls = {"xla": xla_attention,
           "blockwise": lambda *a: blockwise_attention(*a, block_size=BLOCK.value)}
  rows = []
  for T in seq_lens:
    shapes = [jax.ShapeDtypeStruct((B, T, K, G, D), jnp.float32), jax.ShapeDtypeStruct((B, T, K, D), jnp.float32),
              jax.ShapeDtypeStruct((B, T, K, D), jnp.float32), jax.ShapeDtypeStruct((B, T), jnp.int32)]
    for name, fn in impls.items():
      fwd = jax.jit(fn).lower(*shapes).compile()
      loss = lambda q, k, v, i, fn=fn: jnp.sum(fn(q, k, v, i))
      bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
      row = {"backend": "cpu", "impl": name, "seq_len": T, "shape": [B, K, G, D],
             "fwd_temp_mib": fwd.memory_analysis().temp_size_in_bytes / 2**20,
             "fwd_bwd_temp_mib": bwd.memory_analysis().temp_size_in_bytes / 2**20}
      if row["fwd_temp_mib"] > CPU_BUDGET.value * 1024:
        row["fwd_ms"] = None
        row["note"] = f"not run: needs {row['fwd_temp_mib'] / 1024:.1f} GiB temp > {CPU_BUDGET.value} GiB budget"
      else:
        key = jax.random.split(jax.random.key(T), 3)
        q = jax.random.normal(key[0], shapes[0].shape)
        k = jax.random.normal(key[1], shapes[1].shape)
        v = jax.random.normal(key[2], shapes[2].shape)
        q_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        seconds = median_time(lambda: fwd(q, k, v, q_index).block_until_ready(), REPEATS.value)
        row["fwd_ms"] = seconds * 1e3
        row["fwd_gflops"] = causal_flops(B, T, K * G, D) / seconds / 1e9
        del q, k, v
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


# ---- GPU: flash vs jax.nn.dot_product_attention; decode vs copy bandwidth --------------------------------------------
def gpu_flash_rows(seq_lens):
  import jax
  import jax.numpy as jnp
  from kernels.flash_attention import flash_attention
  K, G, D = (int(x) for x in GPU_HEADS.value.split(","))
  rows = []
  for T in seq_lens:
    B = max(1, GPU_TOKENS.value // T)
    key = jax.random.split(jax.random.key(T), 3)
    q = jax.random.normal(key[0], (B, T, K * G, D), jnp.bfloat16)
    k = jax.random.normal(key[1], (B, T, K, D), jnp.bfloat16)
    v = jax.random.normal(key[2], (B, T, K, D), jnp.bfloat16)
    impls = {
        "pallas": lambda q, k, v: flash_attention(q.reshape(B, T, K, G, D), k, v).reshape(q.shape),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
    }
    flops = causal_flops(B, T, K * G, D)
    for name, fn in impls.items():
      row = {"backend": "gpu", "impl": name, "seq_len": T, "batch": B, "shape": [K, G, D]}
      for mode, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):  # backward = 2.5 forwards (recomputes scores)
        if mode == "fwd":
          f = jax.jit(fn)
        else:
          f = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        try:
          seconds = median_time(lambda: jax.block_until_ready(f(q, k, v)), REPEATS.value)
          row[f"{mode}_ms"] = seconds * 1e3
          row[f"{mode}_tflops"] = mult * flops / seconds / 1e12
        except Exception as e:  # noqa: BLE001  (OOM or an implementation unavailable here: record and go on)
          row[f"{mode}_ms"] = None
          row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def gpu_block_sweep_rows(T, sweep):
  """The Pallas kernel at one length under several tilings (fwd and fwd+bwd causal TFLOP/s)."""
  import jax
  import jax.numpy as jnp
  from kernels.flash_attention import BlockSizes, flash_attention
  K, G, D = (int(x) for x in GPU_HEADS.value.split(","))
  B = max(1, GPU_TOKENS.value // T)
  key = jax.random.split(jax.random.key(T), 3)
  q = jax.random.normal(key[0], (B, T, K, G, D), jnp.bfloat16)
  k = jax.random.normal(key[1], (B, T, K, D), jnp.bfloat16)
  v = jax.random.normal(key[2], (B, T, K, D), jnp.bfloat16)
  flops = causal_flops(B, T, K * G, D)
  rows = []
  for spec in sweep:
    blocks = BlockSizes(*(int(x) for x in spec.split("/")))
    fn = lambda q, k, v, blocks=blocks: flash_attention(q, k, v, block_sizes=blocks)
    row = {"backend": "gpu", "impl": "pallas_blocks", "blocks": spec, "seq_len": T, "batch": B}
    for mode, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):
      f = jax.jit(fn) if mode == "fwd" else jax.jit(jax.grad(
          lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
      try:
        seconds = median_time(lambda: jax.block_until_ready(f(q, k, v)), REPEATS.value)
        row[f"{mode}_tflops"] = mult * flops / seconds / 1e12
      except Exception as e:  # noqa: BLE001  (a tiling Triton cannot fit: record it)
        row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def gpu_decode_rows():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kernels.paged_attention import paged_attention, quantize_kv
  K, G, D = (int(x) for x in GPU_HEADS.value.split(","))
  x = jnp.ones((COPY_MIB.value << 19,), jnp.bfloat16)
  copy = jax.jit(lambda x: x + 1)
  seconds = median_time(lambda: copy(x).block_until_ready(), 10)
  copy_gbs = 2 * x.nbytes / seconds / 1e9  # read + write
  del x
  rows = [{"backend": "gpu", "impl": "copy", "gb_per_s": copy_gbs}]
  B, ctx, ps = (int(x) for x in DECODE.value.split(","))
  pps = ctx // ps
  num_pages = B * pps
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.permutation(num_pages).reshape(B, pps), jnp.int32)
  lengths = jnp.full((B,), ctx, jnp.int32)
  q = jax.random.normal(jax.random.key(0), (B, K * G, D), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (K, num_pages, ps, D), jnp.bfloat16)
  v = jax.random.normal(jax.random.key(2), (K, num_pages, ps, D), jnp.bfloat16)
  variants = {"paged_bf16": (k, v, None, None)}
  (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
  variants["paged_int8"] = (kq, vq, ks, vs)
  for name, (kk, vv, ks_, vs_) in variants.items():
    for pb in (None, 1, 4):  # the default tile, and one smaller and one larger (a failing size is recorded)
      fn = jax.jit(lambda *a, pb=pb: paged_attention(*a, pages_per_block=pb))
      row = {"backend": "gpu", "impl": name if pb is None else f"{name}_pb{pb}", "batch": B, "context": ctx,
             "page_size": ps}
      try:
        seconds = median_time(lambda: fn(q, kk, vv, table, lengths, ks_, vs_).block_until_ready(), 20)
      except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        continue
      nbytes = kk.nbytes + vv.nbytes + (0 if ks_ is None else ks_.nbytes + vs_.nbytes)
      gbs = nbytes / seconds / 1e9
      row.update(us=seconds * 1e6, gb_per_s=gbs, fraction_of_copy=gbs / copy_gbs)
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def ratio_table(rows):
  lines = []
  cpu = {(r["impl"], r["seq_len"]): r for r in rows if r["backend"] == "cpu"}
  if cpu:
    lines.append("CPU      T   blockwise ms   xla ms   time xla/blockwise   temp MiB blockwise / xla (fwd, fwd+bwd)")
    for T in sorted({t for _, t in cpu}):
      b, x = cpu[("blockwise", T)], cpu[("xla", T)]
      ratio = f"{x['fwd_ms'] / b['fwd_ms']:.2f}" if x.get("fwd_ms") else "xla not run"
      xms = f"{x['fwd_ms']:.0f}" if x.get("fwd_ms") else "-"
      temps = (f"{b['fwd_temp_mib']:.0f} / {x['fwd_temp_mib']:.0f}, "
               f"{b['fwd_bwd_temp_mib']:.0f} / {x['fwd_bwd_temp_mib']:.0f}")
      lines.append(f"{T:>9} {b['fwd_ms']:>12.0f} {xms:>8} {ratio:>20}   {temps}")
  gpu = {(r["impl"], r["seq_len"]): r for r in rows if r["backend"] == "gpu" and "seq_len" in r}
  if gpu:
    lines.append("GPU      T   pallas TF/s fwd (bwd)   vs xla   vs cudnn")
    for T in sorted({t for _, t in gpu}):
      p = gpu[("pallas", T)]
      fmt = lambda r, m: r.get(f"{m}_tflops")
      rel = lambda other: " / ".join(
          f"{fmt(p, m) / fmt(other, m):.2f}" if fmt(p, m) and fmt(other, m) else "-" for m in ("fwd", "fwd_bwd"))
      lines.append(f"{T:>9}   {fmt(p, 'fwd') or 0:.1f} ({fmt(p, 'fwd_bwd') or 0:.1f})   {rel(gpu[('xla', T)])}   "
                   f"{rel(gpu[('cudnn', T)])}")
  for r in rows:
    if r["impl"] == "pallas_blocks":
      lines.append(f"pallas blocks {r['blocks']}: fwd {r.get('fwd_tflops', 0):.0f}, "
                   f"fwd+bwd {r.get('fwd_bwd_tflops', 0):.0f} TFLOP/s")
    if r["impl"].startswith("paged") and "error" in r:
      lines.append(f"decode {r['impl']}: failed ({r['error'][:80]})")
    elif r["impl"].startswith("paged"):
      lines.append(f"decode {r['impl']}: {r['gb_per_s']:.0f} GB/s = {r['fraction_of_copy']:.0%} of copy bandwidth")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax
  seq_lens = [int(s) for s in SEQ_LENS.value]
  backend = jax.default_backend()
  rows = cpu_rows(seq_lens) if backend == "cpu" else []
  if backend == "gpu":
    rows += gpu_flash_rows(seq_lens) + gpu_decode_rows()
    if BLOCK_SWEEP.value:
      rows += gpu_block_sweep_rows(seq_lens[0], BLOCK_SWEEP.value)
  result = {"backend": backend, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": rows}
  print(ratio_table(rows))
  if OUT.value:
    with open(OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
