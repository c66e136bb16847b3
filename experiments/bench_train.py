"""Train-step throughput: our jitted step vs the machine's matmul peak and a PyTorch/transformers peer.

  python experiments/bench_train.py --out=/tmp/bench_train.json [--preset=50m --seq_len=512 --batch=4]
  # on a GPU: the InternLM2-1.8B step in bfloat16 against the card's measured bf16 matmul peak
  python experiments/bench_train.py --preset=internlm2-1.8b --dtype=bfloat16 --seq_len=4096 --batch=4 \
      --attention_impl=pallas --remat_policy=save_dots --loss_chunk_size=1024 --scan_layers

Measured in one run on the same machine: (1) the peak matmul rate in the compute dtype (random operands), (2) our
train step (AdamW, float32 master weights, compute in --dtype) on the preset, (3) transformers' LlamaForCausalLM
with the same shapes and torch AdamW (on a GPU: float32 weights under bf16 autocast, fused AdamW, SDPA attention).
Prints a ratio table and writes {"mfu", "tokens_per_sec", "torch_tokens_per_sec", "speedup_vs_torch", ...}.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from internlm_jax import host_memory  # noqa: E402

OUT = flags.DEFINE_string("out", None, "JSON results file")
PRESET = flags.DEFINE_string("preset", "50m", "ModelConfig preset")
SEQ = flags.DEFINE_integer("seq_len", 512, "sequence length")
BATCH = flags.DEFINE_integer("batch", 4, "batch size")
STEPS = flags.DEFINE_integer("steps", 6, "timed steps (after 2 warm-up steps)")
REMAT = flags.DEFINE_string("remat_policy", "none", "remat policy for our step")
ATTENTION = flags.DEFINE_string("attention_impl", "chunked", "attention: xla | chunked | blockwise | pallas | cudnn")
BLOCK = flags.DEFINE_integer("attention_block_size", 128, "query chunk (chunked) or block (blockwise)")
LOSS_CHUNK = flags.DEFINE_integer("loss_chunk_size", 0, "tokens per chunk of the fused head + loss (0: all)")
SCAN = flags.DEFINE_bool("scan_layers", False, "scan over layers (default unrolled: 0.3 s/step faster on CPU)")
TORCH = flags.DEFINE_bool("torch", True, "also time the PyTorch peer")
OURS_JSON = flags.DEFINE_string("ours_json", None, "time only the peer; take our figures from this earlier --out of "
                                 "the same flags (on a GPU each then has the whole card)")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (weights stay float32)")


def _median_step_time(fn, steps):
  from internlm_jax.train.metrics import median_seconds
  return median_seconds(fn, steps)


def bench_ours(config, batch, seq, steps):
  import jax
  import numpy as np
  from internlm_jax.train import OptimizerConfig, create_train_state, make_optimizer, make_train_step
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=100))
  state = create_train_state(config, tx, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
  data = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
          "loss_mask": np.ones((batch, seq), np.int32)}
  data = jax.tree.map(jax.numpy.asarray, data)
  step = make_train_step(config, tx)
  holder = [state]

  def one():
    holder[0], metrics = step(holder[0], data)
    metrics["loss"].block_until_ready()

  for _ in range(2):
    one()
  return _median_step_time(one, steps)


def bench_torch(config, batch, seq, steps):
  import contextlib
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  autocast = (torch.autocast(device, dtype=torch.bfloat16) if config.dtype == "bfloat16"
              else contextlib.nullcontext())
  hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                   num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                   head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                   rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
  with torch.device(device):  # built in place: initialising 1.8B weights on the host first takes longer
    model = LlamaForCausalLM(hf).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          fused=device == "cuda")
  tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  def one():
    with autocast:
      logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()

  try:
    for _ in range(2):
      one()
  except torch.OutOfMemoryError:  # recompute like our remat does, rather than report no peer at all
    opt.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    model.gradient_checkpointing_enable()
    print("torch peer: out of memory without checkpointing; timing it with gradient checkpointing", flush=True)
    for _ in range(2):
      one()
  return _median_step_time(one, steps)


def main(argv):
  host_memory.reuse_freed_memory()  # before the first computation (internlm_jax/host_memory.py)
  del argv
  import jax
  from internlm_jax.config import get_preset
  from internlm_jax.train.metrics import measure_matmul_peak
  config = get_preset(PRESET.value).replace(remat_policy=REMAT.value, attention_impl=ATTENTION.value,
                                            attention_block_size=BLOCK.value, loss_chunk_size=LOSS_CHUNK.value,
                                            scan_layers=SCAN.value, dtype=DTYPE.value)
  batch, seq = BATCH.value, SEQ.value
  tokens = batch * seq
  on_cpu = jax.default_backend() == "cpu"
  flops_per_token = config.flops_per_token(seq)
  if OURS_JSON.value:
    with open(OURS_JSON.value) as f:
      earlier = json.load(f)
    mine = {"preset": PRESET.value, "batch": batch, "seq_len": seq, "dtype": config.dtype}
    if any(earlier.get(k) != v for k, v in mine.items()):
      raise SystemExit(f"--ours_json={OURS_JSON.value} was measured with "
                       f"{ {k: earlier.get(k) for k in mine} }, not {mine}: rerun it with these flags")
    peak, ours = earlier["peak_flops"], earlier["step_seconds"]
  else:
    peak = (measure_matmul_peak(n=2048, dtype=DTYPE.value) if on_cpu else
            measure_matmul_peak(n=8192, repeats=20, dtype=DTYPE.value, warmup_seconds=1.0))
    ours = bench_ours(config, batch, seq, STEPS.value)
  result = {"machine": jax.devices()[0].device_kind, "backend": jax.default_backend(), "preset": PRESET.value,
            "params": config.num_params(), "batch": batch, "seq_len": seq, "peak_flops": peak,
            "dtype": config.dtype, "remat_policy": config.remat_policy, "jax": jax.__version__,
            "attention_impl": config.attention_impl, "attention_block_size": config.attention_block_size,
            "loss_chunk_size": config.loss_chunk_size, "scan_layers": config.scan_layers,
            "flops_per_token": flops_per_token, "step_seconds": ours, "tokens_per_sec": tokens / ours,
            "mfu": tokens / ours * flops_per_token / peak}
  from internlm_jax.train.metrics import KNOWN_PEAK_FLOPS
  datasheet = [f for name, f in KNOWN_PEAK_FLOPS.items() if name.lower() in result["machine"].lower()]
  if datasheet and not on_cpu:  # the vendor's dense peak, for comparison with MFUs quoted elsewhere
    result["mfu_vs_datasheet"] = tokens / ours * flops_per_token / datasheet[0]
  print(json.dumps(result), flush=True)  # ours, before the peer runs (a peer that hangs loses nothing)
  rows = [(f"peak {DTYPE.value} matmul", f"{peak / 1e9:,.0f} GFLOP/s", ""),
          ("ours", f"{tokens / ours:,.0f} tok/s", f"MFU {result['mfu']:.2f}")]
  theirs = None
  if TORCH.value:
    try:
      theirs = bench_torch(config, batch, seq, STEPS.value)
    except Exception as e:  # noqa: BLE001  (a peer that cannot run here: keep our numbers, say why)
      result["torch_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      rows.append(("torch peer", "failed", result["torch_error"][:60]))
  if theirs is not None:
    result.update(torch_tokens_per_sec=tokens / theirs, torch_mfu=tokens / theirs * flops_per_token / peak,
                  speedup_vs_torch=theirs / ours)
    rows.append(("torch peer", f"{tokens / theirs:,.0f} tok/s", f"MFU {result['torch_mfu']:.2f}"))
    rows.append(("ours / torch", f"{result['speedup_vs_torch']:.2f}x", ""))
  print(f"\n{PRESET.value} ({config.num_params() / 1e6:.0f}M params), batch {batch} x seq {seq}, "
        f"{jax.devices()[0].device_kind}")
  for name, value, extra in rows:
    print(f"  {name:<16} {value:>18} {extra}")
  if OUT.value:
    with open(OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
