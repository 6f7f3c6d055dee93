"""What reading W1 once costs on this GPU, with no head math: the practical floor of the decode scorer.

The issues state the decode floor as W1's bytes over the copy bandwidth of a 1 GiB device-to-device
copy. A decode step reads 105 MB (d = 5120) in one kernel launched from a CUDA graph, which also pays
the launch, the ramp-up to full bandwidth and the tail. This times, as graph replays over rotated
weight copies, kernels that read W1 once: ``torch.sum``, cuBLAS's product of W1 with one and with
16 rows (the first layer alone), and a plain Triton kernel streaming W1 through TMA (several shapes),
so the best of them is what a decode kernel pays for its bytes in practice. ``python -m benchmarks.read_floor [--out PATH]``.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import copy_bandwidth, environment, write_result
from .bench_kernels import graph_us, weight_copies


@triton.jit
def _stream_rows_kernel(w1, out_ptr, rows_per_program, d, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[p] = sum of W1's rows [p * rows_per_program, (p + 1) * rows_per_program): one flat loop
    over the program's tiles, so Triton pipelines every load of the stream."""
    pid = tl.program_id(0)
    columns = tl.cdiv(d, BLOCK_C)
    tiles = tl.cdiv(rows_per_program, BLOCK_R) * columns
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for i in range(tiles):
        acc += w1.load([pid * rows_per_program + (i // columns) * BLOCK_R, (i % columns) * BLOCK_C]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def stream_read(w1: torch.Tensor, programs: int, block_r: int, block_c: int, stages: int, out: torch.Tensor):
    rows = w1.shape[0] // programs
    desc = TensorDescriptor.from_tensor(w1, [block_r, block_c])
    _stream_rows_kernel[(programs,)](desc, out, rows, w1.shape[1], BLOCK_R=block_r, BLOCK_C=block_c,
                                     num_warps=4, num_stages=stages)


# (programs, rows per tile, columns per tile, pipeline stages); H200 has 132 SMs.
SHAPES = [(128, 16, 256, 4), (128, 16, 256, 6), (256, 8, 256, 6), (128, 32, 128, 6), (640, 16, 128, 4)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    result = {"benchmark": "read_floor", "environment": environment(device),
              "copy_bandwidth_GBps": bandwidth / 1e9, "rows": []}
    for d in (5120, 1536):
        heads = weight_copies(d, device)
        w1s = [(h[0],) for h in heads]
        floor_us = (2 * d * d + 4 * d) * 2 / bandwidth * 1e6
        x1 = torch.randn(d, device=device, dtype=heads[0][0].dtype)
        x16 = torch.randn(16, d, device=device, dtype=heads[0][0].dtype)
        row = {"d": d, "w1_MB": 2 * d * d * 2 / 1e6, "copy_floor_us": floor_us,
               "torch_sum_us": graph_us(lambda w: torch.sum(w, dtype=torch.float32), w1s),
               # cuBLAS's matrix-vector and 16-row products: W1 . h alone, no bias, ReLU or W2.
               "cublas_gemv_us": graph_us(lambda w, x=x1: torch.mv(w, x), w1s),
               "cublas_gemm_16_rows_us": graph_us(lambda w, x=x16: x @ w.t(), w1s)}
        out = torch.empty(1024, dtype=torch.float32, device=device)
        for programs, block_r, block_c, stages in SHAPES:
            if (2 * d) % (programs * block_r):
                continue
            key = f"triton_tma_{programs}x{block_r}x{block_c}_s{stages}_us"
            try:
                row[key] = graph_us(lambda w, p=programs, r=block_r, c=block_c, s=stages, o=out: stream_read(w, p, r, c, s, o), w1s)
            except Exception as error:  # a shape that does not fit is a result, not a crash
                row[key] = f"{type(error).__name__}: {str(error)[:120]}"
        timed = [v for k, v in row.items() if k.endswith("_us") and k != "copy_floor_us" and isinstance(v, float)]
        row["best_us"] = min(timed)
        row["best_x_copy_floor"] = row["best_us"] / floor_us
        result["rows"].append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del heads, w1s
        torch.cuda.empty_cache()
    write_result(result, args.out, f"{result['environment']['device_slug']}-read-floor.json")
    return result


if __name__ == "__main__":
    main()
