#!/usr/bin/env bash
# One device call: end-to-end scoring overhead (1.5B and 7B shapes) and training-step peak memory (1.5B, 8k tokens).
# Usage on the GPU machine: bash benchmarks/gpu_e2e_session.sh [NEW_TOKENS]; results land in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
NEW_TOKENS=${1:-256}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -m benchmarks e2e --models 1.5b,7b --batch 1,16,64 --new-tokens "$NEW_TOKENS" --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
for backend in reference auto; do
  XBAI_KERNELS_BACKEND=$backend python3 benchmarks/bench_train_memory.py --device cuda --shape 1.5b --tokens 8192 \
    --dtype bfloat16 --out "$OUT/train-memory-$backend.json" 2>&1 | tail -25 | tee "$OUT/train-memory-$backend.log"
done
