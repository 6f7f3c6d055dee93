"""Cost of one ``DecodeScorer.step`` (candidates, head on the step rows, record) per decode step.

What an engine pays after every sampled token, measured three ways on the same inputs: ``eager``
(back-to-back Python calls, host overhead included: what a plain decode loop sees), ``graph`` (the
whole step captured once in a CUDA graph and replayed: what an engine with persistent buffers can
pay), and the released form hooked into the loop (``isin`` + boolean gather + ``nn.Sequential`` in
bf16 + sigmoid, which synchronizes with the host). A quarter of the rows sample a step token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import xbai_kernels as xk

from ._common import environment, progress, write_result

STEP_ID, THINK_START, THINK_END = 13, 3, 4


def _inputs(batch: int, d: int, device, seed: int):
    """hidden [B, d] bf16 and two sampled-id sets whose step rows are disjoint quarters of the batch.

    Alternating the two keeps a quarter of the rows real step candidates at every step: a row whose
    current token is already a step token opens no step (SPEC: first of a run only).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(batch, d, device=device, generator=g, dtype=torch.float32).to(torch.bfloat16)
    order = torch.randperm(batch, device=device, generator=g)
    quarter = max(1, batch // 4)
    sets = []
    for rows in (order[:quarter], order[quarter : 2 * quarter] if batch > 1 else order[:0]):
        sampled = torch.randint(20, 1000, (batch,), device=device, generator=g)
        sets.append(sampled.index_fill(0, rows, STEP_ID))
    return hidden, sets


# Each number is the median of this many timed windows of ``calls`` calls; min and max are kept.
REPEATS = 5


def _per_call_us(fn, calls: int, device, per_call: int = 1) -> tuple[float, float, float]:
    """(median, min, max) over REPEATS windows of the time per call of ``fn`` / ``per_call``."""
    fn()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
        samples.append(1e6 * (time.perf_counter() - start) / calls / per_call)
    return statistics.median(samples), min(samples), max(samples)


def _record(row: dict, key: str, timing: tuple[float, float, float]) -> None:
    row[key] = timing[0]
    row.setdefault("min_max", {})[key] = [timing[1], timing[2]]


def measure(batch: int, d: int, device, calls: int) -> dict:
    rule = xk.StepRule((STEP_ID,), THINK_START, THINK_END)
    head = xk.SPRMHead(d, device=device, dtype=torch.bfloat16).eval()
    # Events past capacity are counted and dropped: the same device work as recording them.
    scorer = xk.DecodeScorer(head, rule, batch, capacity=64)
    slots = torch.arange(batch, device=device)
    positions = torch.zeros(batch, dtype=torch.int64, device=device)
    hidden, (first, second) = _inputs(batch, d, device, seed=batch + d)
    scorer.step(hidden, torch.full_like(first, 7), slots, positions)  # every current token plain

    def ours():  # two decode steps
        scorer.step(hidden, first, slots, positions)
        scorer.step(hidden, second, slots, positions)

    row = {"batch": batch, "d": d, "step_rows": int((first == STEP_ID).sum())}
    _record(row, "ours_eager_us", _per_call_us(ours, calls, device, per_call=2))

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        ours()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours()
    _record(row, "ours_graph_us", _per_call_us(graph.replay, calls, device, per_call=2))

    released = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * d, 1))
    released = released.to(device=device, dtype=torch.bfloat16).eval()
    step_ids = rule.step_ids_tensor(device)

    def released_hook():
        rows = torch.isin(first, step_ids)
        torch.sigmoid(released(hidden[rows]).float())

    with torch.inference_mode():
        _record(row, "released_hook_eager_us", _per_call_us(released_hook, calls, device))
    return row


def markdown_table(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"One `DecodeScorer.step` per decode step on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
        f"bf16, a quarter of the rows are steps; {env['date'][:10]}), us per step, median of "
        f"{REPEATS} windows (min and max in the JSON):",
        "",
        "| d | B | step rows | ours, eager calls | ours, CUDA-graph replay | released head hooked in (eager) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['d']} | {r['batch']} | {r['step_rows']} | {r['ours_eager_us']:.1f} | {r['ours_graph_us']:.1f} | "
            f"{r['released_hook_eager_us']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks decode_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", default="1536,5120")
    parser.add_argument("--batch", default="1,16,64,256")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="d 5120, B 1 and 16, 50 calls")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks decode_step: needs a CUDA GPU")
    if args.quick:
        args.d, args.batch, args.calls = "5120", "1,16", 50
    device = torch.device("cuda")
    rows = []
    shapes = [(int(d), int(b)) for d in args.d.split(",") for b in args.batch.split(",")]
    for d, batch in progress(shapes, "decode_step", lambda s: f"d={s[0]} B={s[1]}"):
        rows.append(measure(batch, d, device, args.calls))
        r = rows[-1]
        print(
            f"d={d:<5} B={batch:<4} ours eager {r['ours_eager_us']:7.1f} us | graph {r['ours_graph_us']:6.1f} us "
            f"| released hook {r['released_hook_eager_us']:7.1f} us",
            flush=True,
        )
    result = {"benchmark": "decode_step", "environment": environment(device), "calls": args.calls, "rows": rows}
    write_result(result, args.out, f"{result['environment']['device_slug']}-decode-step.json")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
