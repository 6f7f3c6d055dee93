#!/usr/bin/env bash
# The vLLM GPU suite on the lent GPU: carried CUDA vLLM 0.26 (../shared/tools/vllm-gpu), this
# checkout on PYTHONPATH with its vllm.general_plugins entry point, then the GPU vLLM tests and/or
# the vLLM benchmark. Results land in $OUT (default benchmarks/results).
#
#   mkdir -p .vllm-gpu && cp ../shared/tools/vllm-gpu/vllm-0.26.0-sm90.tar.xz .vllm-gpu/vllm-gpu.tar.xz
#   (device call, carry .vllm-gpu)  bash benchmarks/run_vllm_gpu.sh tests
#   bash benchmarks/run_vllm_gpu.sh bench --parts recorder,throughput --models 1.5b
#   bash benchmarks/run_vllm_gpu.sh python path/to/script.py ARGS
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" /tmp/vb /tmp/xbai-site
[ -d /tmp/vb/site/vllm ] || python3 -c "import tarfile; tarfile.open('.vllm-gpu/vllm-gpu.tar.xz').extractall('/tmp/vb', filter='data')"
# vLLM finds plugins by entry point: a dist-info beside the checkout declares this one.
info=/tmp/xbai-site/xbai_kernels-0.1.0.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: xbai-kernels\nVersion: 0.1.0\n' > "$info/METADATA"
printf '[vllm.general_plugins]\nxbai_kernels_sprm = xbai_kernels.vllm:register\n' > "$info/entry_points.txt"
export PYTHONPATH=/tmp/vb/site:/tmp/xbai-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
part=${1:-tests}; shift || true
case "$part" in
  # vLLM's Triton attention runs fp32 dots as TF32 unless told otherwise; the fp32 exactness test
  # needs IEEE fp32 (read when Triton compiles, so it is set before anything imports Triton).
  tests) TRITON_F32_DEFAULT=ieee python3 -m pytest -q -ra -p no:cacheprovider tests/vllm/test_vllm_gpu.py tests/vllm/test_vllm_prefix_share.py \
           tests/vllm/test_vllm_recorder.py tests/test_triton_record.py "$@" 2>&1 | tee "$OUT/vllm-gpu-tests.log" ;;
  bench) python3 -m benchmarks vllm "$@" 2>&1 | tee "$OUT/vllm-gpu-bench.log" ;;
  # Any script under the same environment (a diagnosis, a profile). vLLM forks its engine process
  # unless torch has initialised CUDA; a script that only asked torch.cuda.is_available() has
  # initialised the driver all the same, and the forked engine then hangs at start-up (seen on the
  # H100). So spawn, which needs the script's top level guarded by `if __name__ == "__main__"`.
  python) VLLM_WORKER_MULTIPROC_METHOD=${VLLM_WORKER_MULTIPROC_METHOD:-spawn} python3 "$@" 2>&1 | tee "$OUT/vllm-gpu-python.log" ;;
  *) echo "usage: $0 tests|bench|python [ARGS]"; exit 2 ;;
esac
