#!/usr/bin/env bash
# One device call for the Triton backend: the kernel benchmark, the CUDA-marked tests, the
# launch-shape sweep, then the CPU-shape tests compiled on the GPU. Each stage has its own time
# limit so that a slow one cannot starve the rest; everything lands under $OUT.
#   usage (on the GPU machine, repository root): OUT=/some/dir bash benchmarks/gpu_triton_check.sh [full]
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XBAI_KERNELS_BUILD_CUDA=0
OUT=${OUT:-/tmp/xbai-triton-out}
mkdir -p "$OUT"
MODE=${1:-quick}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

if [ "$MODE" = full ]; then
  timeout 50 python3 -m pytest -q -ra -p no:cacheprovider tests/test_triton_gpu.py 2>&1 | tee "$OUT/pytest.log"
  timeout 165 python3 -m benchmarks kernels --budget 140 --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log"
  timeout 60 python3 -m benchmarks kernels --sections= --sweep --budget 50 --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log"
else
  timeout 90 python3 -m benchmarks kernels --quick --no-compile --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log"
  timeout 75 python3 -m pytest -q -ra -p no:cacheprovider tests/test_triton_gpu.py 2>&1 | tee "$OUT/pytest.log"
  timeout 75 python3 -m benchmarks kernels --sections= --sweep --budget 65 --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log"
  timeout 45 python3 -m pytest -q -ra -p no:cacheprovider --timeout 40 tests/test_triton_ops.py tests/test_triton_train.py \
    tests/test_triton_golden.py 2>&1 | tee "$OUT/pytest_small.log"
fi
echo "== summary"
grep -E "passed|failed|error" "$OUT"/pytest*.log | tail -5
tail -40 "$OUT/bench.log"
