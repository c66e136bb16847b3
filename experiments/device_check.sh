#!/usr/bin/env bash
# The GPU checks of one device lease, in order of importance, each under a share of one deadline:
#   1. the InternLM2-1.8B train step in bf16 (Pallas flash attention, save_dots remat) against the card's measured
#      bf16 matmul peak and a transformers peer on the same card (BENCHMARKS.md, issue 3);
#   2. the Pallas kernels' tests compiled through Triton (not interpret mode);
#   3. bench_attention's GPU rows: flash vs XLA / cuDNN attention, paged decode vs copy bandwidth.
# Usage (repository root, on the GPU machine): OUT=/tmp/out bash experiments/device_check.sh [seconds]
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${1:-500} ))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
# JAX and the torch peer share the card in one process: JAX takes 60%, torch the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
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
  grep -v "^I[0-9]\{4\}\|^W[0-9]\{4\}" "$OUT/$name.log" | tail -n 14
  return $rc
}

TRAIN="experiments/bench_train.py --preset=internlm2-1.8b --dtype=bfloat16 --seq_len=4096 --batch=4
       --loss_chunk_size=1024 --scan_layers --steps=5"
stage env 40 bash -c 'nvidia-smi -L; python3 -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)"'
stage train 260 $PY $TRAIN --attention_impl=pallas --remat_policy=save_dots --out="$OUT/train_1_8b.json" ||
  stage train_xla 200 $PY $TRAIN --attention_impl=xla --remat_policy=full --out="$OUT/train_1_8b_xla.json"
stage kernels 120 env JAX_PLATFORMS=cuda $PY -m pytest -q -x -p no:cacheprovider --timeout=100 \
  tests/test_flash_attention.py tests/test_paged_attention.py
stage attention 150 $PY experiments/bench_attention.py --seq_lens=4096,16384 --repeats=5 --out="$OUT/attention.json"
echo "=== done, $(( deadline - $(date +%s) ))s before the deadline"
