#!/usr/bin/env bash
# The issue-7 suites at full size, one PART per device call (each fits ~400 s of a 600 s call);
# JSON, PNG and logs land in $OUT under the names the README's report expects.
#
#   bash benchmarks/gpu_e2e_session.sh e2e-1.5b      1.5B: CUDA-graph loop B 1,16,64 x 2048 tokens (~310 s)
#   bash benchmarks/gpu_e2e_session.sh e2e-7b        7B: CUDA-graph loop B 1,16 x 2048 tokens (~290 s)
#   bash benchmarks/gpu_e2e_session.sh e2e-7b-b64    7B: CUDA-graph loop B 64 x 2048 tokens (~160 s)
#   bash benchmarks/gpu_e2e_session.sh e2e-eager     1.5B and 7B: eager (host-bound) loop B 16 x 256 tokens (~150 s)
#   bash benchmarks/gpu_e2e_session.sh kernels       kernel suite, every shape and column (~350 s, capped by --budget)
#   bash benchmarks/gpu_e2e_session.sh train-memory  training-step peak memory, 1.5B shape, 8k tokens (issue 6)
#
# NEW_TOKENS (2048), REPS (3), BATCH override the e2e defaults. Each e2e part writes
# <device>-e2e-<part>.json; report.py shows them all (copy them to benchmarks/results/).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
PART=${1:-e2e-1.5b}
NEW_TOKENS=${NEW_TOKENS:-2048}
REPS=${REPS:-3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
SLUG=$(python3 -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")

# H200 cost of one decode step in the CUDA-graph loop (ms, HuggingFace Qwen2, bf16): 1.5B measured
# (4.2-4.7 ms at B 16/64, 384 tokens), 7B guessed from its 5x weight bytes. Each batch size decodes
# 3 modes x REPS whole runs; the eager loop (B 16, 256 tokens, 10 runs) is host-bound at ~22 ms a step.
estimate() {  # $1 = model, $2 = batch sizes, $3 = 1 with the eager loop
  python3 -c '
import sys
model, batches, eager, tokens, reps = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
step_ms = {"1.5b": 4.5, "7b": 6.5}[model]
graph = sum(3 * reps * tokens * step_ms / 1e3 + 10 for _ in batches)
eager_s = 10 * 256 * 0.022 + 5 if eager else 0
print(f"estimate: {model} B {sys.argv[2]}: ~{graph + eager_s + 30:.0f} s "
      f"(graph loop {graph:.0f} s, eager loop {eager_s:.0f} s, model and setup ~30 s)", flush=True)
' "$1" "$2" "$3" "$NEW_TOKENS" "$REPS"
}

e2e() {  # $1 = model, $2 = batch sizes, $3 = decode loops, $4 = file tag
  estimate "$1" "$2" "$([[ $3 == *eager* ]] && echo 1 || echo 0)"
  python3 -m benchmarks e2e --models "$1" --batch "$2" --new-tokens "$NEW_TOKENS" --reps "$REPS" \
    --decode "$3" --eager-batch 16 --eager-new-tokens 256 \
    --out "$OUT/$SLUG-e2e-$4.json" 2>&1 | tee "$OUT/e2e-$4.log"
}

case "$PART" in
  e2e-1.5b) e2e 1.5b "${BATCH:-1,16,64}" graph 1.5b ;;
  e2e-7b) e2e 7b "${BATCH:-1,16}" graph 7b ;;
  e2e-7b-b64) e2e 7b "${BATCH:-64}" graph 7b-b64 ;;
  e2e-eager)
    echo "estimate: ~150 s (2 models x 3 modes x 3 runs of 256 host-bound steps at ~20-25 ms, plus warm-ups)"
    python3 -m benchmarks e2e --models 1.5b,7b --batch 16 --reps "$REPS" --decode eager --eager-batch 16 \
      --eager-new-tokens 256 --out "$OUT/$SLUG-e2e-eager.json" 2>&1 | tee "$OUT/e2e-eager.log"
    ;;
  kernels)
    echo "estimate: kernels ~350 s (42 decode shapes x backends eager+graph, packed, train, torch.compile columns; optional work stops at --budget 420)"
    python3 -m benchmarks kernels --budget 420 --out "$OUT/$SLUG-kernels.json" 2>&1 | tee "$OUT/kernels.log"
    ;;
  train-memory)
    echo "estimate: train-memory ~120 s"
    for backend in reference auto; do
      XBAI_KERNELS_BACKEND=$backend python3 benchmarks/bench_train_memory.py --device cuda --shape 1.5b --tokens 8192 \
        --dtype bfloat16 --out "$OUT/train-memory-$backend.json" 2>&1 | tail -25 | tee "$OUT/train-memory-$backend.log"
    done
    ;;
  *)
    echo "unknown part $PART (e2e-1.5b | e2e-7b | e2e-7b-b64 | kernels | train-memory)" >&2
    exit 2
    ;;
esac
