"""Launch-shape sweep of the Triton decode scorer (``head_logits_masked``) on a GPU.

Every configuration is timed as a CUDA-graph replay on rotated weight copies (the way the kernel runs
inside a captured decode step) and checked twice: against the reference head, and bitwise against the
first configuration of its shape (the fixed-order reduction makes the bits independent of the launch
shape). Used to pick ``decode.default_config``; the chosen defaults are then measured by the kernel
suite. ``python -m benchmarks.sweep_triton_decode [--out PATH]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from xbai_kernels.ops import reference
from xbai_kernels.ops.triton import decode

from ._common import copy_bandwidth, environment, write_result
from .bench_kernels import decode_sets, graph_us, weight_copies

D = decode.DecodeConfig

# (d, B, step rows) -> configurations; the first of each list is the current default. Unit counts
# per program for the H200's 132 SMs: 10240 / 132 -> 78 (d = 5120), 3072 / 132 -> 24 (d = 1536).
T = dict(w1_tma=True)
F = dict(fused_reduction=False)
PLAN: dict[tuple[int, int, int], list[D]] = {
    # Sweep 8: the one-launch sum reads partials stored by step rank (contiguous) at B >= 256. The
    # first of each list is the default. Earlier sweeps are in their JSON files.
    (5120, 256, 64): [
        D(64, 128, 128, 8, 4, **F, tile_units=78),
        D(64, 128, 128, 8, 4, tile_units=78),
        D(64, 128, 128, 8, 4, tile_units=78, sum_tiles=256, sum_rows=32),
        D(64, 128, 128, 8, 4, tile_units=78, **T),
        D(64, 128, 128, 8, 4, sum_tiles=128, sum_rows=64, **T),
    ],
    (5120, 256, 0): [D(64, 128, 128, 8, 4, **F, tile_units=78), D(64, 128, 128, 8, 4, tile_units=78)],
    (5120, 1024, 256): [D(128, 128, 128, 8, 3, **F), D(128, 128, 128, 8, 3), D(128, 128, 128, 8, 3, sum_tiles=128, sum_rows=64)],
    (5120, 1024, 0): [D(128, 128, 128, 8, 3, **F), D(128, 128, 128, 8, 3)],
    (5120, 1, 1): [D(16, 128, 128, 4, 4, **T)],
    (1536, 256, 64): [D(64, 32, 128, 4, 4, **F), D(64, 32, 128, 4, 4), D(64, 32, 128, 4, 4, sum_tiles=128, sum_rows=32)],
    (1536, 256, 0): [D(64, 32, 128, 4, 4, **F), D(64, 32, 128, 4, 4)],
    (1536, 1, 1): [D(16, 32, 256, 4, 4, **T)],
}


def read_floor_us(d: int, heads) -> float:
    """Graph-timed median of reading W1 once with torch.sum (a read-only stream, no math worth the
    name): what any decode kernel at this d pays for its bytes alone."""
    return graph_us(lambda w1: torch.sum(w1, dtype=torch.float32), [(h[0],) for h in heads])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default=None, metavar="D,B,STEPS,INDEX",
                        help="only run PLAN[(D, B, STEPS)][INDEX] a few times (for ncu), no timing")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    if args.profile:
        return profile_once(*map(int, args.profile.split(",")), device=device)
    bandwidth = copy_bandwidth(device)
    result = {"environment": environment(device), "copy_bandwidth_GBps": bandwidth / 1e9, "rows": []}
    started = time.perf_counter()
    for d in sorted({d for d, _, _ in PLAN}, reverse=True):
        heads = weight_copies(d, device)
        floor_us = (2 * d * d + 4 * d) * 2 / bandwidth * 1e6
        result.setdefault("read_w1_us", {})[d] = read_floor_us(d, heads)
        print(f"d={d}: reading W1 with torch.sum: {result['read_w1_us'][d]:.2f} us (copy floor {floor_us:.2f})", flush=True)
        for (dd, batch, steps), configs in PLAN.items():
            if dd != d:
                continue
            sets = decode_sets(batch, d, steps, heads, device, seed=batch + steps)
            hidden, mask, w1, b1, w2, b2, _ = sets[0]
            expected = reference.head_logits_masked(hidden, mask, w1, b1, w2, b2)
            first_bits = None
            for cfg in configs:
                row = {"d": d, "B": batch, "step_rows": steps, "floor_us": floor_us, **cfg.__dict__}
                try:
                    got = decode.head_logits_masked(hidden, mask, w1, b1, w2, b2, config=cfg)
                    row["max_abs_err"] = float((got - expected).abs().max())
                    row["bitwise_as_first"] = bool(first_bits is None or torch.equal(got, first_bits))
                    first_bits = got if first_bits is None else first_bits
                    call = lambda h, m, w1, b1, w2, b2, out, cfg=cfg: decode.head_logits_masked(
                        h, m, w1, b1, w2, b2, out=out, config=cfg)
                    row["graph_us"] = graph_us(call, sets)
                    row["x_floor"] = row["graph_us"] / floor_us if steps else None
                except Exception as error:  # a launch shape that does not fit is a result, not a crash
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                result["rows"].append(row)
                print(f"d={d:5d} B={batch:5d} steps={steps:4d} {cfg} -> "
                      f"{row.get('graph_us', float('nan')):7.2f} us err={row.get('max_abs_err')} "
                      f"same_bits={row.get('bitwise_as_first')} {row.get('error', '')}", flush=True)
        del heads
        torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - started
    write_result(result, args.out, f"{result['environment']['device_slug']}-triton-decode-sweep.json")
    return result


def profile_once(d: int, batch: int, steps: int, index: int, device) -> dict:
    """Five eager calls of one planned configuration on fresh weights (for a profiler to pick)."""
    cfg = PLAN[(d, batch, steps)][index]
    sets = decode_sets(batch, d, steps, weight_copies(d, device), device, seed=batch + steps)
    for k in range(5):
        hidden, mask, w1, b1, w2, b2, out = sets[k % len(sets)]
        decode.head_logits_masked(hidden, mask, w1, b1, w2, b2, out=out, config=cfg)
    torch.cuda.synchronize()
    return {"profiled": cfg.__dict__}


if __name__ == "__main__":
    main()
