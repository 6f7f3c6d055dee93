#!/usr/bin/env bash
# The issue-7 suites at full size, one PART per device call (each fits ~400 s of a 600 s call);
# JSON, PNG and logs land in $OUT under the names the README's report expects.
#
#   bash benchmarks/gpu_e2e_session.sh e2e-1.5b      1.5B shape: CUDA-graph loop B 1,16,64 x 2048 tokens, eager loop B 16
#   bash benchmarks/gpu_e2e_session.sh e2e-7b        7B shape, the same
#   bash benchmarks/gpu_e2e_session.sh kernels       kernel suite, every shape and column
#   bash benchmarks/gpu_e2e_session.sh train-memory  training-step peak memory, 1.5B shape, 8k tokens (issue 6)
#
# NEW_TOKENS (2048), REPS (3), BATCH (1,16,64) override the e2e defaults. The e2e parts write
# <device>-e2e-1.5b.json and <device>-e2e-7b.json; report.py shows both (copy them to benchmarks/results/).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
PART=${1:-e2e-1.5b}
NEW_TOKENS=${NEW_TOKENS:-2048}
REPS=${REPS:-3}
BATCH=${BATCH:-1,16,64}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
SLUG=$(python3 -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")

# Rough H200 costs per decode step in the CUDA-graph loop (ms) at B 1/16/64, from the quick calibration
# run; each batch size decodes 3 modes x REPS whole runs, plus capture and the re-forward.
estimate() {  # $1 = model
  python3 - "$1" "$NEW_TOKENS" "$REPS" "$BATCH" <<'EOF'
import sys
model, tokens, reps, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
step_ms = {"1.5b": {1: 1.6, 16: 1.9, 64: 2.8}, "7b": {1: 4.4, 16: 5.0, 64: 6.4}}[model]
graph = sum(3 * reps * tokens * step_ms.get(int(b), max(step_ms.values())) / 1e3 + 15 for b in batches)
eager = 10 * 256 * 0.022 + 5  # B 16, 256 tokens, host-bound at ~22 ms a step
print(f"estimate: {model} e2e ~{graph + eager + 30:.0f} s (graph loop {graph:.0f} s, eager loop {eager:.0f} s, setup 30 s)")
EOF
}

case "$PART" in
  e2e-1.5b|e2e-7b)
    model=${PART#e2e-}
    estimate "$model"
    python3 -m benchmarks e2e --models "$model" --batch "$BATCH" --new-tokens "$NEW_TOKENS" --reps "$REPS" \
      --decode graph,eager --eager-batch 16 --eager-new-tokens 256 \
      --out "$OUT/$SLUG-e2e-$model.json" 2>&1 | tee "$OUT/e2e-$model.log"
    ;;
  kernels)
    echo "estimate: kernels ~300 s (42 decode shapes x 3 backends eager+graph, packed, train, 15 decode compiles)"
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
    echo "unknown part $PART (e2e-1.5b | e2e-7b | kernels | train-memory)" >&2
    exit 2
    ;;
esac
