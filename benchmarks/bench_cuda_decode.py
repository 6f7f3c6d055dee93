"""Decode scorer (head_logits_masked) per backend against the memory floor, on one CUDA GPU.

The floor: the bytes the op must move (W1, b1, W2 and the step rows of hidden read once, the
logits written once) over the device's copy bandwidth, measured in the same run (a large
device-to-device copy, counting bytes read plus written). Each backend is timed two ways:
``graph``, replays of a CUDA graph holding several calls (the kernels alone, as vLLM runs them),
and ``eager``, back-to-back calls from Python (kernels plus host overhead). Weight sets rotate,
enough of them that together they exceed 2.5x the L2 (at least two), so no call finds W1 in L2
(105 MB at d = 5120 in bf16 against 50-60 MB of L2; d = 1536 needs ~14 sets). Every timed row also
records min and max over the repeats.

    PYTHONPATH=. python benchmarks/bench_cuda_decode.py --out benchmarks/results/cuda_decode_<gpu>.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, environment, write_result  # noqa: E402

BACKENDS = ("cuda", "triton", "reference")
# CUDA backend variants timed as separate columns, as the environment values they set.
VARIANT_VARIABLES = ("XBAI_KERNELS_CUDA_PIPELINE", "XBAI_KERNELS_CUDA_PDL", "XBAI_KERNELS_CUDA_TAIL")
CUDA_VARIANTS = {
    "cuda-auto": ("auto", "1", "auto"),
    "cuda-stream": ("stream", "1", "fused"),
    "cuda-stream-kernel": ("stream", "1", "kernel"),
    "cuda-stream-nopdl": ("stream", "0", "auto"),
    "cuda-wide": ("wide", "1", "auto"),
}
MIN_CALLS_PER_GRAPH = 10


def load_backend(name: str):
    try:
        module = importlib.import_module(f"xbai_kernels.ops.{name}")
    except Exception as exc:  # an optional backend may be missing in any way
        return None, f"{type(exc).__name__}: {exc}"
    reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    if reason is None and not hasattr(module, "head_logits_masked"):
        reason = "no head_logits_masked"
    return (None, reason) if reason else (module, None)


def time_graph(call, calls_per_graph: int, repeats: int = 30) -> list[float]:
    """Seconds per call of each replay of a graph of ``calls_per_graph`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls_per_graph):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls_per_graph)
    return times


def time_eager(call, calls: int = 50, repeats: int = 7) -> float:
    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            call(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=5120)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256], help="B with B/4 step rows")
    parser.add_argument("--zero-step-batches", type=int, nargs="*", default=[1, 256, 1024], help="B with no step row")
    parser.add_argument("--all-steps", action="store_true", help="also time the largest B with every row a step")
    parser.add_argument("--variants", nargs="+", default=["cuda-auto", "cuda-wide"], choices=list(CUDA_VARIANTS))
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    d = args.d
    bandwidth = copy_bandwidth(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    element = torch.finfo(dtype).bits // 8
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    weight_sets = max(2, -(-int(2.5 * l2_bytes) // (2 * d * d * element)))
    calls_per_graph = max(MIN_CALLS_PER_GRAPH, weight_sets)
    first = tuple(
        t.to(device=device, dtype=dtype)
        for t in (torch.randn(2 * d, d, generator=g) / d**0.5, torch.randn(2 * d, generator=g) * 0.1,
                  torch.randn(1, 2 * d, generator=g) / (2 * d) ** 0.5, torch.randn(1, generator=g) * 0.1)
    )
    # Copies of one head (the same logits, other addresses): only the bytes matter for the timing.
    heads = [first] + [tuple(t.clone() for t in first) for _ in range(weight_sets - 1)]
    cases = [(b, max(1, b // 4)) for b in args.batches]
    cases += [(b, 0) for b in args.zero_step_batches]
    if args.all_steps:
        cases.append((max(args.batches), max(args.batches)))

    backends = {}  # column -> (module, CUDA_VARIANTS environment values or None)
    skipped = {}
    for name in BACKENDS:
        module, reason = load_backend(name)
        if module is None:
            skipped[name] = reason
        elif name == "cuda":
            for column in args.variants:
                backends[column] = (module, CUDA_VARIANTS[column])
        else:
            backends[name] = (module, None)

    rows = []
    for batch, steps in cases:
        hidden = torch.randn(batch, d, generator=g).to(device=device, dtype=dtype)
        mask = torch.zeros(batch, dtype=torch.bool)
        mask[torch.randperm(batch, generator=g)[:steps]] = True
        mask = mask.to(device)
        out = torch.empty(batch, device=device)
        floor_bytes = (2 * d * d + 2 * d + 2 * d + 1 + steps * d) * element + batch + 4 * batch
        # A step-free batch must not read W1 at all: its floor is the mask and the zeros.
        floor_s = floor_bytes / bandwidth if steps else (batch + 4 * batch) / bandwidth
        expected = backends["reference"][0].head_logits_masked(hidden, mask, *heads[0]) if "reference" in backends else None
        cuda_bits = None
        for name, (module, variant) in backends.items():
            if variant is not None:
                os.environ.update(zip(VARIANT_VARIABLES, variant))

            def call(i, module=module, hidden=hidden, mask=mask, out=out):
                return module.head_logits_masked(hidden, mask, *heads[i % weight_sets], out=out)

            call(0)
            same_bits = None
            if variant is not None:
                cuda_bits = out.clone() if cuda_bits is None else cuda_bits
                same_bits = bool(torch.equal(out, cuda_bits))
            error = None
            if expected is not None:
                error = float((out - expected).norm() / expected.norm().clamp_min(1e-30)) if steps else float(out.abs().max())
            graph_times = time_graph(call, calls_per_graph)
            graph_s = statistics.median(graph_times)
            eager_s = time_eager(call)
            rows.append({
                "backend": name, "batch": batch, "step_rows": steps, "d": d, "dtype": args.dtype,
                "graph_us": graph_s * 1e6, "graph_min_us": min(graph_times) * 1e6,
                "graph_max_us": max(graph_times) * 1e6, "eager_us": eager_s * 1e6,
                "floor_us": floor_s * 1e6, "graph_over_floor": graph_s / floor_s if steps else None,
                "relative_error_vs_reference": error, "same_bits_as_first_cuda_variant": same_bits,
            })
            for variable in VARIANT_VARIABLES:
                os.environ.pop(variable, None)
            print(f"{name:>15} B={batch:<4} steps={steps:<4} graph {graph_s * 1e6:8.1f} us  eager {eager_s * 1e6:8.1f} us"
                  f"  floor {floor_s * 1e6:7.1f} us  err {error}", flush=True)

    result = {
        "benchmark": "cuda_decode",
        "environment": environment(device),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "calls_per_graph": calls_per_graph,
        "weight_sets": weight_sets,
        "l2_bytes": l2_bytes,
        "cuda_module_targets": next((m.compiled_targets() for m, v in backends.values() if v is not None), None),
        "skipped_backends": skipped,
        "rows": rows,
    }
    write_result(result, args.out, f"cuda_decode_{result['environment']['device_slug']}.json")


if __name__ == "__main__":
    main()


def markdown_table(result: dict) -> str:
    """README table: the CUDA decode kernel per pipeline shape against Triton and the memory floor."""
    env = result["environment"]
    lines = [
        f"CUDA decode head on {env['device']} (torch {env['torch']}, {env['date'][:10]}; CUDA-graph replay, us):",
        "",
        "| backend | d | B | step rows | graph us | eager us | floor us | graph / floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['backend']} | {row['d']} | {row['batch']} | {row['step_rows']} | {row['graph_us']:.1f} | "
            f"{row['eager_us']:.1f} | {row['floor_us']:.1f} | {row.get('graph_over_floor') or float('nan'):.2f} |"
        )
    return "\n".join(lines)
