#!/usr/bin/env bash
# One lent-GPU session for the CUDA backend (run from the repo root, the built module carried along):
# proves the _C.abi3.so compiled on the CPU machine (torch 2.13, Python 3.11) imports and runs here
# (torch 2.11, Python 3.12), times the decode scorer, runs the GPU tests and the shared kernel suite.
# Stage time limits keep the whole call under ~225 s.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/.gpu_out}
mkdir -p "$OUT"
MODULE=xbai_kernels/_C.abi3.so
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
sha256sum "$MODULE" | tee "$OUT/module_sha256.txt"
python3 -c "import xbai_kernels._C as c; print('imported', c.__file__, c.compiled_targets())" || exit 1
timeout 70 python3 benchmarks/bench_cuda_decode.py --out "$OUT/cuda_decode.json" 2>&1 | tee "$OUT/bench.log"
timeout 75 python3 -m pytest -q -ra -p no:cacheprovider -m cuda tests/test_cuda_backend.py 2>&1 | tee "$OUT/pytest.log" | tail -25
timeout 70 python3 -m benchmarks kernels --quick --no-compile --budget 55 --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernels suite rc=$? (log: kernels.log)"; tail -25 "$OUT/kernels.log"
# Hardware counters for one decode launch at B = 1 per pipeline shape (DRAM throughput, stalls).
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for shape in wide deep; do
  [ -n "$NCU" ] || break
  echo "== ncu $shape" >> "$OUT/ncu.txt"
  XBAI_KERNELS_CUDA_PIPELINE=$shape timeout 45 "$NCU" --clock-control none -k regex:head_items --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    python3 -c "
import torch; from xbai_kernels.ops import cuda as c
d = 5120; w1 = torch.randn(2 * d, d, device='cuda', dtype=torch.bfloat16) / d ** 0.5
b1, w2, b2 = (torch.randn(n, device='cuda', dtype=torch.bfloat16) for n in (2 * d, 2 * d, 1))
h = torch.randn(1, d, device='cuda', dtype=torch.bfloat16); m = torch.ones(1, dtype=torch.bool, device='cuda')
[c.head_logits_masked(h, m, w1, b1, w2.view(1, -1), b2) for _ in range(4)]; torch.cuda.synchronize()
" >> "$OUT/ncu.txt" 2>&1
done
grep -E "== ncu|DRAM Throughput|Memory Throughput|Duration|Stall Long|Stall Barrier|Warp Cycles Per Issued|L2 Hit" "$OUT/ncu.txt" | head -40
echo "== decode summary (graph us)"
grep -E "B=(1|16|256) " "$OUT/bench.log"
