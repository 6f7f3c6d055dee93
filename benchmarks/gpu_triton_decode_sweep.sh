#!/usr/bin/env bash
# One device call for the Triton kernels' launch shapes: their GPU tests, the graph-timed decode sweep
# (benchmarks/sweep_triton_decode.py), the packed section of the kernel suite (PACKED=1, no
# torch.compile), and Nsight Compute sections of the decode kernel at the shapes in PROFILE_CASES
# (where the time goes: DRAM throughput, stall reasons). Everything lands under $OUT.
#   usage (on the GPU machine, repository root): OUT=/some/dir bash benchmarks/gpu_triton_decode_sweep.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XBAI_KERNELS_BUILD_CUDA=0
OUT=${OUT:-/tmp/xbai-decode-sweep}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_triton_gpu.py \
  tests/test_triton_record.py tests/test_triton_steps.py tests/test_triton_golden.py tests/test_cuda_backend.py 2>&1 | tail -6
timeout 240 python3 -m benchmarks.sweep_triton_decode --out "$OUT/sweep.json" 2>&1 | grep -v "^wrote" | \
  sed -e 's/DecodeConfig(//' -e 's/block_//g' -e 's/num_//g' -e 's/fused_reduction/fused/' | tee "$OUT/sweep.log"
if [[ ${PACKED:-0} == 1 ]]; then
  timeout 200 python3 -m benchmarks kernels --sections packed --no-compile --out "$OUT/packed.json" 2>&1 | \
    grep -v "^wrote" | tail -12
fi
for case in ${PROFILE_CASES-"1536,1,1,0" "5120,1,1,0" "5120,256,64,0"}; do
  timeout 60 ncu --clock-control none -k regex:masked_partials --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    python3 -m benchmarks.sweep_triton_decode --profile "$case" > "$OUT/ncu-${case//,/-}.txt" 2>&1
  echo "== ncu $case"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued" \
    "$OUT/ncu-${case//,/-}.txt" | head -12
done
