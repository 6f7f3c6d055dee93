#!/usr/bin/env bash
# One lent-GPU session for the CUDA backend (run from the repo root, the built module carried along):
# proves the _C.abi3.so compiled on the CPU machine (torch 2.13, Python 3.11) imports and runs here
# (torch 2.11, Python 3.12), runs the GPU tests, times the decode scorer per pipeline against Triton
# and the copy-bandwidth floor at d = 5120 and 1536, and takes ncu counters of streaming launches.
# Stage time limits keep the whole call under ~330 s. XBAI_SESSION_VARIANTS picks the CUDA columns.
set -uo pipefail
SECONDS=0
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/.gpu_out}
mkdir -p "$OUT"
MODULE=xbai_kernels/_C.abi3.so
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
sha256sum "$MODULE" | tee "$OUT/module_sha256.txt"
python3 -c "import xbai_kernels._C as c; print('imported', c.__file__, c.compiled_targets())" || exit 1
# A hung or faulting kernel ends the call here instead of eating every later stage's time limit.
timeout 40 python3 -c "
import torch; from xbai_kernels.ops import cuda as c, reference as r
for d, B, steps in ((5120, 1, 1), (5120, 256, 64), (1536, 16, 0)):
    w1 = torch.randn(2 * d, d, device='cuda', dtype=torch.bfloat16) / d ** 0.5
    b1, w2, b2 = (torch.randn(n, device='cuda', dtype=torch.bfloat16) for n in (2 * d, 2 * d, 1))
    h = torch.randn(B, d, device='cuda', dtype=torch.bfloat16); m = torch.arange(B, device='cuda') < steps
    got = c.head_logits_masked(h, m, w1, b1, w2.view(1, -1), b2); torch.cuda.synchronize()
    want = r.head_logits_masked(h, m, w1, b1, w2.view(1, -1), b2)
    print('smoke', d, B, steps, float((got - want).abs().max()))
" 2>&1 | tee "$OUT/smoke.log" || { echo "smoke failed: stopping"; exit 1; }
VARIANTS=${XBAI_SESSION_VARIANTS:-cuda-stream cuda-stream-kernel cuda-stream-nopdl cuda-wide}
# XBAI_SESSION_QUICK=1: the smoke test and the counters only.
if [ "${XBAI_SESSION_QUICK:-0}" != 1 ]; then
  timeout 240 python3 -m pytest -q -ra -x -p no:cacheprovider -m cuda tests/test_cuda_backend.py 2>&1 | tee "$OUT/pytest.log" | tail -15
  timeout 100 python3 benchmarks/bench_cuda_decode.py --d 5120 --variants $VARIANTS --out "$OUT/cuda_decode_5120.json" \
    2>&1 | tee "$OUT/bench_5120.log"
  timeout 45 python3 benchmarks/bench_cuda_decode.py --d 1536 --zero-step-batches --variants $VARIANTS \
    --out "$OUT/cuda_decode_1536.json" 2>&1 | tee "$OUT/bench_1536.log"
fi
# Hardware counters for single streaming decode launches (DRAM and L2 throughput, pipes, stalls),
# one per batch of XBAI_SESSION_NCU_BATCHES (a quarter of the rows are steps).
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && [ "${XBAI_SESSION_NCU:-1}" = 1 ]; then
  for batch in ${XBAI_SESSION_NCU_BATCHES:-1 256}; do
    echo "== ncu stream B=$batch" >> "$OUT/ncu.txt"
    XBAI_KERNELS_CUDA_PIPELINE=stream timeout 40 "$NCU" --clock-control none \
      -k regex:head_stream --launch-skip 2 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section ComputeWorkloadAnalysis --section WarpStateStats --section LaunchStats --section Occupancy \
      python3 -c "
import torch; from xbai_kernels.ops import cuda as c
d = 5120; B = $batch; w1 = torch.randn(2 * d, d, device='cuda', dtype=torch.bfloat16) / d ** 0.5
b1, w2, b2 = (torch.randn(n, device='cuda', dtype=torch.bfloat16) for n in (2 * d, 2 * d, 1))
h = torch.randn(B, d, device='cuda', dtype=torch.bfloat16); m = torch.arange(B, device='cuda') % 4 == 0
[c.head_logits_masked(h, m, w1, b1, w2.view(1, -1), b2) for _ in range(4)]; torch.cuda.synchronize()
" >> "$OUT/ncu.txt" 2>&1
  done
  grep -E "== ncu|DRAM Throughput|Duration|L2 Hit|Warp Cycles Per Issued" "$OUT/ncu.txt" | head -40
fi
echo "== decode summary (graph us: median [min-max])"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for path in sorted(pathlib.Path(sys.argv[1]).glob("cuda_decode_*.json")):
    r = json.loads(path.read_text())
    print(path.name, "copy", round(r["copy_bandwidth_GBps"]), "GB/s, weight sets", r["weight_sets"])
    for row in r["rows"]:
        print(f"  {row['backend']:>15} B={row['batch']:<5} steps={row['step_rows']:<4} {row['graph_us']:7.1f} "
              f"[{row['graph_min_us']:.1f}-{row['graph_max_us']:.1f}] floor {row['floor_us']:6.1f}"
              f" bits={row['same_bits_as_first_cuda_variant']}")
PY
echo "session took ${SECONDS} s"
