#!/usr/bin/env bash
# The GPU checks of one device lease, each under a share of one deadline (results: BENCHMARKS.md, GPU section):
#   1. kernels: the Pallas kernels' and the cuDNN attention's tests compiled for the GPU (not interpret mode);
#   2. train: the InternLM2-1.8B step in bf16 (cuDNN attention, save_dots remat) against the card's measured bf16
#      matmul peak, then the transformers peer in a second process so that each has the whole card;
#   3. attention: Pallas flash vs XLA / cuDNN, a sweep of Pallas tilings, paged decode vs copy bandwidth;
#   4. serve: decode tokens/s, float32 and int8 weights, against transformers generate on the card (int8's
#      whole-weight path on a GPU was not yet timed: the CPU-only row blocks are off there since session 6);
#   5. load: continuous vs static batching under Poisson arrivals (section c, 200 requests), never run on a GPU yet:
#      on this CPU decode at batch 32 is compute-bound, so batching gains little (1.35-1.40x, target 2x).
# Usage (repository root, on the GPU machine): OUT=/tmp/out bash experiments/device_check.sh [seconds]
# PRESET / SEQ / BATCH / ATTN override the train shape (a dry run on CPU: PRESET=tiny SEQ=64 BATCH=2).
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${1:-500} ))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
PY=${PY:-python3}

stage() {  # stage NAME MAX_SECONDS CMD...: log to $OUT/NAME.log, show its tail
  local name=$1 max=$2 left
  shift 2
  left=$(( deadline - $(date +%s) ))
  (( left < max )) && max=$left
  if (( max < 20 )); then echo "=== $name skipped: deadline"; return 1; fi
  echo "=== $name (up to ${max}s)"
  local start=$(date +%s)
  timeout "$max" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - start ))s"
  grep -v "^[IW][0-9]\{4\}" "$OUT/$name.log" | tail -n 12
  return $rc
}

stage env 40 bash -c 'nvidia-smi -L; python3 -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)"'
stage kernels 100 env JAX_PLATFORMS=cuda $PY -m pytest -q -p no:cacheprovider --timeout=90 \
  tests/test_attention_cudnn.py tests/test_flash_attention.py tests/test_paged_attention.py
TRAIN="experiments/bench_train.py --preset=${PRESET:-internlm2-1.8b} --dtype=bfloat16 --seq_len=${SEQ:-4096}
       --batch=${BATCH:-4} --loss_chunk_size=1024 --scan_layers --steps=5 --remat_policy=save_dots"
ATTN=${ATTN:-cudnn}
stage train 150 $PY $TRAIN --attention_impl=$ATTN --torch=false --out="$OUT/train.json" ||
  { ATTN=pallas; stage train 120 $PY $TRAIN --attention_impl=$ATTN --torch=false --out="$OUT/train.json"; }
[ -f "$OUT/train.json" ] && stage train_torch 150 $PY $TRAIN --attention_impl=$ATTN --ours_json="$OUT/train.json" \
  --out="$OUT/train_torch.json"
stage attention 140 $PY experiments/bench_attention.py --seq_lens=4096 --repeats=5 --out="$OUT/attention.json" \
  --gpu_block_sweep=128/64/64/64,128/128/64/64,64/64/64/64,128/64/128/64,128/64/64/128,64/128/64/64
stage serve 120 $PY experiments/bench_serve.py --sections=decode --llamacpp=false --out="$OUT/serve.json"
stage load 120 $PY experiments/bench_serve.py --sections=load --rates=auto --out="$OUT/load.json"
echo "=== done, $(( deadline - $(date +%s) ))s before the deadline"
