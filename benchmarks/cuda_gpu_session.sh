#!/usr/bin/env bash
# One lent-GPU session for the CUDA backend (run from the repo root, the built module carried along):
# proves the _C.abi3.so compiled on the CPU machine (torch 2.13, Python 3.11) imports and runs here
# (torch 2.11, Python 3.12), runs the GPU tests, reads the SASS, and times the decode scorer.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/.gpu_out}
mkdir -p "$OUT"
MODULE=xbai_kernels/_C.abi3.so
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
sha256sum "$MODULE" | tee "$OUT/module_sha256.txt"
python3 -c "import xbai_kernels._C as c; print('imported', c.__file__, c.compiled_targets())" || exit 1
# Tensor-core and async-copy instructions in the Hopper code, and any local-memory traffic.
cuobjdump -sass -arch sm_90a "$MODULE" | grep -oE "HMMA[.A-Z0-9]*|LDGSTS[.A-Z0-9]*|LDSM[.A-Z0-9]*|LDL[.A-Z0-9]*|STL[.A-Z0-9]*" \
  | sort | uniq -c | tee "$OUT/sass_summary.txt"
timeout 180 python3 -m pytest -q -ra -m cuda tests/test_cuda_backend.py 2>&1 | tee "$OUT/pytest.log" | tail -40
timeout 100 python3 benchmarks/bench_cuda_decode.py --out "$OUT/cuda_decode.json" 2>&1 | tee "$OUT/bench.log"
