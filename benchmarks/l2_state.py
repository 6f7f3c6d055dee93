"""Decode head timings under two L2 states: why the kernel suite and bench_cuda_decode disagree.

Both replay a CUDA graph of 10 decode calls (d = 5120, a quarter of the rows are steps, two W1
copies alternating). ``clean``: replays back to back, as bench_cuda_decode times them. ``flushed``:
a 256 MB memset before every replay, as ``triton.testing.do_bench`` (the kernel suite) does, which
leaves L2 full of dirty lines. Each row also times the graph with the inputs rotating over four
sets (the suite's way) and with fixed inputs.

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


def decode_sets(batch: int, heads, generator) -> list[tuple]:
    sets = []
    for k in range(4):
        hidden = torch.randn(batch, D, device="cuda", dtype=torch.bfloat16, generator=generator)
        mask = torch.zeros(batch, dtype=torch.bool, device="cuda")
        mask[torch.randperm(batch, device="cuda", generator=generator)[: max(1, batch // 4)]] = True
        sets.append((hidden, mask, *heads[k % len(heads)], torch.empty(batch, device="cuda")))
    return sets


def fixed_inputs(sets: list[tuple]) -> list[tuple]:
    """The first set's hidden, mask and output on every call, the W1 copies still alternating."""
    first = sets[0]
    return [(first[0], first[1], *sets[k % 2][2:6], first[6]) for k in range(CALLS)]


def per_call_us(graph: torch.cuda.CUDAGraph, flush: torch.Tensor | None) -> float:
    times = []
    for _ in range(REPLAYS):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

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
        for name, call in backends.items():
            for rotate in (False, True):
                graph = capture_graph(call, sets if rotate else fixed_inputs(sets), CALLS)
                row = {"backend": name, "batch": batch, "step_rows": max(1, batch // 4), "d": D, "rotate_inputs": rotate,
                       "clean_us": per_call_us(graph, None), "flushed_us": per_call_us(graph, flush)}
                rows.append(row)
                print(f"{name:>6} B={batch:<4} rotate={rotate!s:<5} clean {row['clean_us']:6.2f} us  "
                      f"flushed {row['flushed_us']:6.2f} us", flush=True)
    result = {"benchmark": "l2_state", "environment": environment(torch.device("cuda")), "calls_per_graph": CALLS,
              "replays": REPLAYS, "rows": rows}
    write_result(result, args.out, f"{result['environment']['device_slug']}-l2-state.json")


if __name__ == "__main__":
    main()
