"""Decode head timings under two L2 states: why the kernel suite and bench_cuda_decode disagree.

Both replay a CUDA graph of 10 decode calls (d = 5120, a quarter of the rows are steps, two W1
copies alternating). ``clean``: replays back to back, as bench_cuda_decode times them. ``flushed``:
a 256 MB memset before every replay, as ``triton.testing.do_bench`` (the kernel suite) does, which
leaves L2 full of dirty lines. Each row also times the graph with the inputs rotating over four
sets (the suite's way) and with fixed inputs. ``--calls 1 2 5 10`` varies the calls per graph: with
one call the flushed row is the first call after the memset alone, so the rows show whether the
flush's cost falls on that call or on every call of the graph.

    PYTHONPATH=. python -m benchmarks.l2_state --out benchmarks/results/<gpu>-l2-state.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ._common import environment, write_result
from .bench_kernels import capture_graph

D = 5120
CALLS = 10
REPLAYS = 40
BACKENDS = ("cuda", "triton")


def decode_sets(batch: int, heads, generator) -> list[tuple]:
    sets = []
    for k in range(4):
        hidden = torch.randn(batch, D, device="cuda", dtype=torch.bfloat16, generator=generator)
        mask = torch.zeros(batch, dtype=torch.bool, device="cuda")
        mask[torch.randperm(batch, device="cuda", generator=generator)[: max(1, batch // 4)]] = True
        sets.append((hidden, mask, *heads[k % len(heads)], torch.empty(batch, device="cuda")))
    return sets


def fixed_inputs(sets: list[tuple], calls: int) -> list[tuple]:
    """The first set's hidden, mask and output on every call, the W1 copies still alternating."""
    first = sets[0]
    return [(first[0], first[1], *sets[k % 2][2:6], first[6]) for k in range(calls)]


def per_call_us(graph: torch.cuda.CUDAGraph, flush: torch.Tensor | None, calls: int) -> float:
    times = []
    for _ in range(REPLAYS):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--calls", type=int, nargs="+", default=[CALLS], help="calls per graph")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--rotate", choices=["both", "yes", "no"], default="both", help="rotate the input sets")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rotations = {"both": (False, True), "yes": (True,), "no": (False,)}[args.rotate]

    from xbai_kernels.ops import cuda as cuda_ops
    from xbai_kernels.ops.triton import decode as triton_decode

    generator = torch.Generator(device="cuda").manual_seed(0)
    head = (
        torch.randn(2 * D, D, device="cuda", dtype=torch.bfloat16, generator=generator) / D**0.5,
        torch.randn(2 * D, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.1,
        torch.randn(1, 2 * D, device="cuda", dtype=torch.bfloat16, generator=generator) / (2 * D) ** 0.5,
        torch.randn(1, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.1,
    )
    heads = [head, tuple(t.clone() for t in head)]  # two W1 copies: no call finds W1 in L2
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    backends = {
        "cuda": lambda h, m, w1, b1, w2, b2, o: cuda_ops.head_logits_masked(h, m, w1, b1, w2, b2, out=o),
        "triton": lambda h, m, w1, b1, w2, b2, o: triton_decode.head_logits_masked(h, m, w1, b1, w2, b2, out=o),
    }
    rows = []
    for batch in args.batches:
        sets = decode_sets(batch, heads, generator)
        for name in args.backends:
            for rotate in rotations:
                for calls in args.calls:
                    graph = capture_graph(backends[name], sets if rotate else fixed_inputs(sets, calls), calls)
                    row = {"backend": name, "batch": batch, "step_rows": max(1, batch // 4), "d": D,
                           "rotate_inputs": rotate, "calls_per_graph": calls,
                           "clean_us": per_call_us(graph, None, calls), "flushed_us": per_call_us(graph, flush, calls)}
                    rows.append(row)
                    print(f"{name:>6} B={batch:<4} rotate={rotate!s:<5} calls={calls:<3} clean {row['clean_us']:6.2f} us  "
                          f"flushed {row['flushed_us']:6.2f} us", flush=True)
    result = {"benchmark": "l2_state", "environment": environment(torch.device("cuda")), "replays": REPLAYS,
              "rows": rows}
    write_result(result, args.out, f"{result['environment']['device_slug']}-l2-state.json")


if __name__ == "__main__":
    main()
