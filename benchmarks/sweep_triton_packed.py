"""Launch-shape sweep of the Triton packed head (``head_logits_rows``) on a GPU.

T = 65536 packed rows of which 2% are selected, at d = 1536, 3584 and 5120; every configuration is
timed as a CUDA-graph replay on rotated weight copies and checked against the reference head. Used
to pick ``packed.default_config``. ``python -m benchmarks.sweep_triton_packed [--out PATH]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from xbai_kernels.ops import reference
from xbai_kernels.ops.triton import packed

from ._common import environment, write_result
from .bench_kernels import DTYPE, graph_us, matmul_rate, weight_copies

R = packed.RowsConfig
TMA = {"w1_tma": True}
# The first of each list is the current default.
PLAN: dict[int, list[R]] = {
    5120: [
        R(128, 256, 64, 8, 8, 3), R(128, 256, 64, 8, 8, 3, **TMA), R(128, 256, 64, 8, 8, 4, **TMA),
        R(128, 128, 64, 8, 8, 4, **TMA), R(128, 128, 128, 8, 8, 3, **TMA), R(64, 256, 64, 8, 4, 4, **TMA),
        R(128, 256, 64, 16, 8, 3, **TMA), R(128, 128, 64, 8, 4, 4, **TMA),
    ],
    3584: [
        R(128, 256, 64, 8, 8, 3), R(128, 256, 64, 8, 8, 3, **TMA), R(128, 256, 64, 8, 8, 4, **TMA),
        R(128, 128, 64, 8, 8, 4, **TMA), R(128, 128, 128, 8, 8, 3, **TMA), R(64, 256, 64, 8, 4, 4, **TMA),
    ],
    1536: [
        R(128, 128, 128, 8, 8, 3), R(128, 128, 128, 8, 8, 3, **TMA), R(128, 128, 64, 8, 8, 4, **TMA),
        R(64, 128, 128, 8, 4, 3, **TMA), R(64, 64, 128, 8, 4, 4, **TMA), R(128, 64, 128, 8, 4, 3, **TMA),
    ],
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--step-fraction", type=float, default=0.02)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    rate = matmul_rate(device)
    result = {"environment": environment(device), "matmul_TFLOPs": rate / 1e12, "rows": []}
    started = time.perf_counter()
    for d, configs in PLAN.items():
        heads = weight_copies(d, device)
        g = torch.Generator(device=device).manual_seed(d)
        hidden = torch.randn(args.tokens, d, device=device, dtype=DTYPE, generator=g)
        rows = (torch.rand(args.tokens, device=device, generator=g) < args.step_fraction).nonzero().squeeze(-1)
        n = rows.numel()
        floor_us = 4 * n * d * d / rate * 1e6
        expected = reference.head_logits_rows(hidden, rows, *heads[0])
        arg_sets = [(hidden, rows, *w) for w in heads]
        for cfg in configs:
            row = {"d": d, "n": n, "floor_us": floor_us, **cfg.__dict__}
            try:
                got = packed.head_logits_rows(hidden, rows, *heads[0], config=cfg)
                row["max_abs_err"] = float((got - expected).abs().max())
                call = lambda h, r, w1, b1, w2, b2, cfg=cfg: packed.head_logits_rows(h, r, w1, b1, w2, b2, config=cfg)
                row["graph_us"] = graph_us(call, arg_sets)
                row["x_floor"] = row["graph_us"] / floor_us
            except Exception as error:  # a launch shape that does not fit is a result, not a crash
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            result["rows"].append(row)
            print(f"d={d:5d} n={n} {cfg} -> {row.get('graph_us', float('nan')):8.2f} us "
                  f"({row.get('x_floor', float('nan')):.2f}x floor) err={row.get('max_abs_err')} {row.get('error', '')}",
                  flush=True)
        del heads, hidden
        torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - started
    write_result(result, args.out, f"{result['environment']['device_slug']}-triton-packed-sweep.json")
    return result


if __name__ == "__main__":
    main()
