"""The three SPRM kernels against eager PyTorch, torch.compile and the hardware floor, on one CUDA GPU.

* ``decode``: ``head_logits_masked`` on a decode batch of B rows, none, a quarter or all of them steps;
* ``packed``: ``head_logits_rows`` on 2% and 20% of T = 65536 packed tokens (and the whole
  ``score_trajectories``);
* ``rows``: the head at any number of selected rows (none, one, a quarter, all of B up to 8192, and
  100 of 4096 and of 8192), through both ops as ``auto`` dispatch runs them and through each backend
  (the Triton masked op under each of its two schedules too), against the released head on all rows and on the index-selected rows, all as graph replays,
  with auto's ratios to the best eager form and to the floor;
* ``train``: ``sprm_head_loss`` forward + backward on n step rows, with its peak memory.

Every backend that ``ops.dispatch`` can run here is a column (``XBAI_KERNELS_BACKEND`` forced per
column), so a new backend shows up without touching this file. Baselines: the released head as
eager PyTorch (``nn.Sequential`` in bf16, on all rows and on the boolean-mask gather) and the same
under ``torch.compile``. The floor comes from two ceilings measured in the same run: a large
device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul. Times are medians of
``triton.testing.do_bench`` (CUDA events); inputs rotate between several sets, weights between
enough copies that no call finds them in L2. ``*_graph`` columns replay a CUDA graph of several
calls (the kernels alone, as an engine runs them); the others include Python launch overhead.

``--quick`` keeps every kind of column but times fewer shapes for less time each, and compiles
only at one decode shape (torch.compile dominates the run time otherwise).

    python -m benchmarks kernels [--quick] [--sweep] [--budget SECONDS] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

from ._common import copy_bandwidth, environment, progress, write_result

DTYPE = torch.bfloat16
GRAPH_CALLS = 10
L2_MARGIN = 2  # rotate through at least this many times the L2 size of weights
# do_bench's warm-up and measuring windows in ms; --quick shortens them.
TIMING = {"warmup_ms": 25, "rep_ms": 100}
# Fractions of a decode batch's rows that are steps (issue 7: none, a quarter, all).
DECODE_STEP_FRACTIONS = (0.0, 0.25, 1.0)


# ----- measurement helpers ---------------------------------------------------------------------


class Timing(float):
    """The median of the repetitions in us, carrying the fastest and slowest (``min_us``, ``max_us``)."""

    def __new__(cls, samples_us):
        ordered = sorted(samples_us)
        value = super().__new__(cls, statistics.median(ordered))
        value.min_us, value.max_us = ordered[0], ordered[-1]
        return value

    def per_call(self, calls: int) -> "Timing":
        """The same repetitions divided over ``calls`` calls each (a graph replays several)."""
        return Timing([self.min_us / calls, float(self) / calls, self.max_us / calls])


def median_us(fn, warmup_ms: int | None = None, rep_ms: int | None = None) -> Timing:
    import triton.testing

    warmup_ms = TIMING["warmup_ms"] if warmup_ms is None else warmup_ms
    rep_ms = TIMING["rep_ms"] if rep_ms is None else rep_ms
    return Timing([1e3 * t for t in triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")])


def matmul_rate(device) -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data."""
    a = torch.randn(8192, 8192, device=device, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=device, dtype=DTYPE)
    seconds = median_us(lambda: a @ b) * 1e-6
    return 2 * 8192**3 / seconds


def l2_bytes(device) -> int:
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)


def weight_copies(d: int, device, count_floor: int = 2) -> list[list[torch.Tensor]]:
    """Random heads (W1, b1, W2, b2) in bf16, enough copies to exceed L2_MARGIN x the L2 size."""
    nbytes = (2 * d * d + 4 * d + 1) * 2
    count = max(count_floor, math.ceil(L2_MARGIN * l2_bytes(device) / nbytes))
    g = torch.Generator(device=device).manual_seed(d)
    return [random_head(d, device, g) for _ in range(count)]


def random_head(d: int, device, generator) -> list[torch.Tensor]:
    """(W1, b1, W2, b2) in bf16, scaled like a trained head (logits of order 1), never zeros."""
    w1 = torch.randn(2 * d, d, device=device, generator=generator) / d**0.5
    b1 = torch.randn(2 * d, device=device, generator=generator) * 0.1
    w2 = torch.randn(1, 2 * d, device=device, generator=generator) / (2 * d) ** 0.5
    b2 = torch.randn(1, device=device, generator=generator)
    return [t.to(DTYPE) for t in (w1, b1, w2, b2)]


def released_head(weights) -> nn.Sequential:
    """The released module: nn.Sequential(Linear, ReLU, Dropout, Linear) in bf16, eval mode."""
    w1, b1, w2, b2 = weights
    d = w1.shape[1]
    head = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * d, 1))
    head = head.to(device=w1.device, dtype=DTYPE).eval()
    with torch.no_grad():
        head[0].weight.copy_(w1), head[0].bias.copy_(b1), head[3].weight.copy_(w2), head[3].bias.copy_(b2)
    return head


def released_functional(hidden, w1, b1, w2, b2):
    """The released head's math as a function of its weights, so one compiled graph serves every copy."""
    return F.linear(torch.relu(F.linear(hidden, w1, b1)), w2, b2)


class Rotation:
    """Calls ``fn(*args_k)`` for k = 0, 1, 2, ... cycling through argument sets."""

    def __init__(self, fn, arg_sets):
        self.fn, self.arg_sets, self.k = fn, arg_sets, 0

    def __call__(self):
        args = self.arg_sets[self.k % len(self.arg_sets)]
        self.k += 1
        return self.fn(*args)


def capture_graph(fn, arg_sets, calls: int = GRAPH_CALLS) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn``, each on the next argument set (after two warm-up
    calls on a side stream, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for k in range(2):
            fn(*arg_sets[k % len(arg_sets)])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(calls):
            fn(*arg_sets[k % len(arg_sets)])
    return graph


def graph_us(fn, arg_sets, calls: int = GRAPH_CALLS) -> float:
    """Per-call time of a CUDA graph holding ``calls`` calls, each on the next argument set."""
    return median_us(capture_graph(fn, arg_sets, calls).replay).per_call(calls)


@contextlib.contextmanager
def forced_backend(name: str | None):
    saved = os.environ.get("XBAI_KERNELS_BACKEND")
    if name is None:
        os.environ.pop("XBAI_KERNELS_BACKEND", None)
    else:
        os.environ["XBAI_KERNELS_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("XBAI_KERNELS_BACKEND", None)
        else:
            os.environ["XBAI_KERNELS_BACKEND"] = saved


def backend_ops(op: str, device, sizes=()) -> dict[str, object]:
    """Backend name -> implementation of ``op``, for every backend dispatch can run on ``device``
    (a head op with DTYPE inputs at every hidden size of ``sizes``)."""
    from xbai_kernels.ops import dispatch

    found = {}
    for name in dispatch.BACKENDS:
        with forced_backend(name):
            try:
                for d in sizes or (None,):
                    inputs = None if d is None else dispatch.HeadInputs(DTYPE, d, grad=False)
                    found[name] = dispatch.resolve(op, device, inputs)[1]
            except dispatch.BackendUnavailable as exc:
                print(f"  ({op}: no {name} column: {exc})")
    return found


class Budget:
    """Optional work (torch.compile columns, the sweep) runs only while time is left."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds_needed: float) -> bool:
        return self.left() > seconds_needed


def guarded(row: dict, column: str, fn):
    """row[column] = fn() (a median; its min and max go to row["min_max"][column]), or the error text:
    one failing column must not lose the others."""
    try:
        value = fn()
        row[column] = value
        if isinstance(value, Timing):
            row.setdefault("min_max", {})[column] = [value.min_us, value.max_us]
    except Exception as exc:  # a benchmark records failures instead of stopping the run
        row[column] = None
        row.setdefault("errors", {})[column] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()


# ----- decode ------------------------------------------------------------------------------------


def decode_sets(batch: int, d: int, steps: int, heads, device, seed: int) -> list[tuple]:
    """Argument sets (hidden, row_mask, W1, b1, W2, b2, out) of a decode batch with ``steps`` step rows
    at random positions; enough sets that consecutive calls use different weight copies."""
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for k in range(max(4, len(heads))):
        hidden = torch.randn(batch, d, device=device, dtype=DTYPE, generator=g)
        mask = torch.zeros(batch, dtype=torch.bool, device=device)
        mask[torch.randperm(batch, device=device, generator=g)[:steps]] = True
        sets.append((hidden, mask, *heads[k % len(heads)], torch.empty(batch, device=device)))
    return sets


def decode_step_counts(batch: int) -> list[int]:
    """Step rows of a B-row decode batch at each of DECODE_STEP_FRACTIONS (a quarter of one row is one
    row: every fraction above 0 has at least one step), without repeats (at B = 1: 0 and 1)."""
    counts = []
    for fraction in DECODE_STEP_FRACTIONS:
        steps = 0 if fraction == 0 else max(1, round(fraction * batch))
        if steps not in counts:
            counts.append(steps)
    return counts


def decode_shapes(args) -> list[tuple[int, int, int]]:
    return [(d, b, steps) for d in args.decode_d for b in args.decode_b for steps in decode_step_counts(b)]


def decode_cases(args, device, ceilings, budget) -> list[dict]:
    ops = backend_ops("head_logits_masked", device, args.decode_d)
    rows_out = []
    heads = released = compiled = None
    current_d = None
    compiled_us: dict[tuple[int, int], float | None] = {}
    for d, batch, steps in progress(decode_shapes(args), "decode", lambda s: f"d={s[0]} B={s[1]} steps={s[2]}"):
        if d != current_d:
            del heads, released, compiled
            torch.cuda.empty_cache()
            heads = weight_copies(d, device)
            released = [released_head(w) for w in heads]
            compiled, current_d = None, d
        sets = decode_sets(batch, d, steps, heads, device, seed=batch + d + steps)
        weight_bytes = (2 * d * d + 4 * d + 1) * 2
        floor_bytes = (weight_bytes if steps else 0) + batch + steps * d * 2 + batch * 4
        row = {
            "d": d, "B": batch, "step_rows": steps,
            "floor_memory_us": 1e6 * floor_bytes / ceilings["copy_Bps"],
            "floor_compute_us": 1e6 * 4 * steps * d * d / ceilings["matmul_flops"],
        }
        row["floor_us"] = max(row["floor_memory_us"], row["floor_compute_us"])
        for name, impl in ops.items():
            call = lambda h, m, w1, b1, w2, b2, out, impl=impl: impl(h, m, w1, b1, w2, b2, out=out)
            guarded(row, name, lambda: median_us(Rotation(call, sets)))
            guarded(row, f"{name}_graph", lambda: graph_us(call, sets))
        eager_sets = [(s[0], s[1], released[k % len(released)]) for k, s in enumerate(sets)]
        guarded(row, "eager_released", lambda: median_us(Rotation(lambda h, m, head: head(h), eager_sets)))
        guarded(row, "eager_released_gather", lambda: median_us(Rotation(lambda h, m, head: head(h[m]), eager_sets)))
        # The released form runs the head on every row whatever the step count, so its compiled time
        # depends on (d, B) only: timed once per shape, at the shapes args.compile_decode allows.
        if args.compile and (d, batch) in args.compile_decode and budget.allows(60):
            if (d, batch) not in compiled_us:
                if compiled is None:
                    compiled = torch.compile(released_functional, dynamic=False)
                comp_sets = [s[:6] for s in sets]
                guarded(row, "compile_released", lambda: median_us(Rotation(lambda h, m, *w: compiled(h, *w), comp_sets)))
                compiled_us[(d, batch)] = row["compile_released"]
            else:
                row["compile_released"] = compiled_us[(d, batch)]
        rows_out.append(row)
        print(_line("decode", row), flush=True)
    del heads, released, compiled
    torch.cuda.empty_cache()
    return rows_out


# ----- packed ------------------------------------------------------------------------------------


def packed_cases(args, device, ceilings, budget) -> list[dict]:
    import xbai_kernels as xk

    ops = backend_ops("head_logits_rows", device, args.packed_d)
    total = args.tokens
    out = []
    for d, fraction in progress([(d, f) for d in args.packed_d for f in args.step_fractions], "packed",
                                lambda s: f"d={s[0]} steps={s[1]:.0%}"):
        heads = weight_copies(d, device)
        released = [released_head(w) for w in heads]
        g = torch.Generator(device=device).manual_seed(d)
        sets = []
        for k in range(2):
            hidden = torch.randn(total, d, device=device, dtype=DTYPE, generator=g)
            mask = torch.rand(total, device=device, generator=g) < fraction
            sets.append((hidden, mask, mask.nonzero().squeeze(-1)))
        n = int(sets[0][2].numel())
        bytes_moved = (2 * d * d + 4 * d + 1) * 2 + n * d * 2 + n * 4
        flops = 4 * n * d * d
        row = {
            "d": d, "T": total, "n": n,
            "floor_memory_us": 1e6 * bytes_moved / ceilings["copy_Bps"],
            "floor_compute_us": 1e6 * flops / ceilings["matmul_flops"],
        }
        row["floor_us"] = max(row["floor_memory_us"], row["floor_compute_us"])
        arg_sets = [(s[0], s[2], *heads[k % len(heads)]) for k, s in enumerate(sets * len(heads))]
        for name, impl in ops.items():
            guarded(row, name, lambda impl=impl: median_us(Rotation(impl, arg_sets)))
            guarded(row, f"{name}_graph", lambda impl=impl: graph_us(impl, arg_sets))
        eager_sets = [(s[0], s[1], s[2], released[k % len(released)]) for k, s in enumerate(sets * len(heads))]
        guarded(row, "eager_released_gather", lambda: median_us(Rotation(lambda h, m, r, head: head(h[m]), eager_sets)))
        guarded(row, "eager_released_index", lambda: median_us(Rotation(lambda h, m, r, head: head(h.index_select(0, r)), eager_sets)))
        if args.compile and d in args.compile_packed and budget.allows(60):
            compiled = torch.compile(lambda h, r, *w: released_functional(h.index_select(0, r), *w), dynamic=False)
            guarded(row, "compile_released", lambda: median_us(Rotation(compiled, arg_sets)))
        # The whole packed scorer: step mask on the device, head on the step rows, geometric means.
        rule = xk.StepRule((13,), 3, 4)
        ids = [torch.where(s[1].roll(1), 13, 7) for s in sets]  # a step token right after each step row
        cu = torch.tensor([0, total // 2, total], dtype=torch.int32, device=device)
        sk = xk.SPRMHead(d, device=device, dtype=DTYPE).eval()
        score_sets = list(zip([s[0] for s in sets], ids))
        exact = lambda h, i: xk.score_trajectories(h, i, sk, rule, cu)  # noqa: E731
        bounded = lambda h, i: xk.score_trajectories(h, i, sk, rule, cu, capacity=2 * n)  # noqa: E731
        for name in ops:
            with forced_backend(name):
                guarded(row, f"score_trajectories[{name}]", lambda: median_us(Rotation(exact, score_sets)))
                guarded(row, f"score_trajectories[{name},capacity]", lambda: median_us(Rotation(bounded, score_sets)))
                # Without a host sync the whole scorer captures into a graph: its device time alone.
                guarded(row, f"score_trajectories[{name},capacity]_graph", lambda: graph_us(bounded, score_sets))
        out.append(row)
        print(_line("packed", row), flush=True)
        del heads, released, sets, arg_sets, eager_sets
        torch.cuda.empty_cache()
    return out


# ----- rows: the head at any number of selected rows -----------------------------------------------

ROWS_B = (1, 16, 256, 1024, 8192)
# Few rows of a large buffer: a decode batch right after a common step, a prefill chunk's steps.
ROWS_SPARSE = ((4096, 100), (8192, 100))


def rows_shapes(ds, batches, sparse=ROWS_SPARSE) -> list[tuple[int, int, int]]:
    """(d, B, selected rows): none, one, a quarter and all of each B, then the sparse cases."""
    shapes = []
    for d in ds:
        for batch in batches:
            shapes += [(d, batch, n) for n in dict.fromkeys((0, 1, max(1, batch // 4), batch))]
        shapes += [(d, batch, n) for batch, n in sparse]
    return shapes


def rows_cases(args, device, ceilings, budget) -> list[dict]:
    """Both head ops on n selected rows of B, as graph replays: ``head_logits_masked`` (the rows a
    device mask, their count never on the host) and ``head_logits_rows`` (an index list of n), each
    as ``auto`` dispatch resolves it and as each fast backend runs it; the released bf16 head on
    all B rows and on ``index_select`` of the n rows (cuBLAS); the floor; auto's ratios."""
    from xbai_kernels.ops import dispatch

    fast = [name for name in dispatch.BACKENDS if name != "reference"]
    ops = {op: {k: v for k, v in backend_ops(op, device, args.rows_d).items() if k in fast}
           for op in ("head_logits_masked", "head_logits_rows")}
    masked_triton = ops["head_logits_masked"].get("triton")
    if masked_triton is not None:  # both of its schedules at every B, whichever B would choose
        for schedule in ("decode", "gathered"):
            ops["head_logits_masked"][f"triton-{schedule}"] = (
                lambda *a, schedule=schedule, **k: masked_triton(*a, schedule=schedule, **k))
    rows_out = []
    current_d = heads = released = None
    for d, batch, n in progress(rows_shapes(args.rows_d, args.rows_b), "rows", lambda s: f"d={s[0]} B={s[1]} n={s[2]}"):
        if d != current_d:
            del heads, released
            torch.cuda.empty_cache()
            heads = weight_copies(d, device)
            released = [released_head(w) for w in heads]
            current_d = d
        inputs = dispatch.HeadInputs(DTYPE, d, grad=False)
        sets = decode_sets(batch, d, n, heads, device, seed=batch + d + n)
        sets = [(*s, s[1].nonzero().squeeze(-1)) for s in sets]  # + the selected rows, in order
        weight_bytes = (2 * d * d + 4 * d + 1) * 2
        row = {
            "d": d, "B": batch, "rows": n,
            "floor_memory_us": 1e6 * ((weight_bytes if n else 0) + batch + n * d * 2 + batch * 4) / ceilings["copy_Bps"],
            "floor_compute_us": 1e6 * 4 * n * d * d / ceilings["matmul_flops"],
        }
        row["floor_us"] = max(row["floor_memory_us"], row["floor_compute_us"])
        for op, impls in ops.items():
            short = "masked" if op == "head_logits_masked" else "rows"
            auto_name, auto_impl = dispatch.resolve(op, device, inputs)
            row[f"{short}_auto_backend"] = auto_name
            for name, impl in {"auto": auto_impl, **impls}.items():
                if short == "masked":
                    call = lambda h, m, w1, b1, w2, b2, out, r, impl=impl: impl(h, m, w1, b1, w2, b2, out=out)
                else:
                    call = lambda h, m, w1, b1, w2, b2, out, r, impl=impl: impl(h, r, w1, b1, w2, b2)
                guarded(row, f"{short}[{name}]_graph", lambda: graph_us(call, sets))
        eager = [(s[0], s[7], released[k % len(released)]) for k, s in enumerate(sets)]
        guarded(row, "eager_all_graph", lambda: graph_us(lambda h, r, head: head(h), eager))
        guarded(row, "eager_index_graph", lambda: graph_us(lambda h, r, head: head(h.index_select(0, r)), eager))
        best_eager = min((row[k] for k in ("eager_all_graph", "eager_index_graph") if row.get(k)), default=None)
        for short in ("masked", "rows"):
            auto = row.get(f"{short}[auto]_graph")
            if auto and best_eager:
                row[f"{short}_auto_vs_best_eager"] = auto / best_eager
            if auto and row["floor_us"] > 0.01:
                row[f"{short}_auto_vs_floor"] = auto / row["floor_us"]
        rows_out.append(row)
        print(_line("rows", row), flush=True)
    del heads, released
    torch.cuda.empty_cache()
    return rows_out


# ----- train -------------------------------------------------------------------------------------


def eager_train_loss(hidden, rows, w1, b1, w2, b2, correct, valid, p):
    """The released training path in bf16: gather, h*s + h.detach()*(1-s), Linear-ReLU-Dropout-Linear, SPR loss."""
    from xbai_kernels.ops import reference

    h = hidden.index_select(0, rows)
    h = h * 1e-4 + h.detach() * (1 - 1e-4)
    act = F.dropout(torch.relu(F.linear(h, w1, b1)), p, training=True)
    logits = F.linear(act, w2, b2).squeeze(-1).float()
    loss, _ = reference.spr_loss(logits, correct, valid, torch.ones_like(correct))
    return loss


def train_cases(args, device, ceilings, budget) -> list[dict]:
    ops = backend_ops("sprm_head_loss", device)
    out = []
    for n, d in progress(args.train_shapes, "train", lambda s: f"n={s[0]} d={s[1]}"):
        total = 4 * n
        g = torch.Generator(device=device).manual_seed(n + d)
        hidden = torch.randn(total, d, device=device, dtype=DTYPE, generator=g).requires_grad_()
        rows = torch.randperm(total, device=device, generator=g)[:n].sort().values
        correct = torch.rand(n, device=device, generator=g) < 0.5
        valid = torch.rand(n, device=device, generator=g) < 0.95
        params = [w.requires_grad_() for w in random_head(d, device, g)]
        row = {"n": n, "d": d, "dropout_p": args.dropout, "floor_us": 1e6 * 12 * n * d * d / ceilings["matmul_flops"]}

        def step(loss_fn):
            def run():
                hidden.grad = None
                for w in params:
                    w.grad = None
                loss_fn().backward()
            return run

        columns = {
            name: step(lambda impl=impl: impl(hidden, rows, *params, correct, valid, args.dropout, 1e-4, None, None)[0])
            for name, impl in ops.items()
        }
        columns["eager_released"] = step(lambda: eager_train_loss(hidden, rows, *params, correct, valid, args.dropout))
        if args.compile and (n, d) in args.compile_train and budget.allows(90):
            compiled = torch.compile(eager_train_loss)
            columns["compile_released"] = step(lambda: compiled(hidden, rows, *params, correct, valid, args.dropout))
        def clear_grads():
            hidden.grad = None
            for w in params:
                w.grad = None

        for name, run in columns.items():
            # One forward + backward is ms long: a longer window than the decode ops' for as many samples.
            guarded(row, name, lambda run=run: median_us(run, warmup_ms=2 * TIMING["warmup_ms"], rep_ms=3 * TIMING["rep_ms"]))
            clear_grads()
            guarded(row, f"{name}_peak_MB", lambda run=run: _peak_extra_mb(run))
            clear_grads()
        out.append(row)
        print(_line("train", row), flush=True)
        del hidden, params
        torch.cuda.empty_cache()
    return out


def _peak_extra_mb(run) -> float:
    """Peak memory above what was allocated before one forward + backward (inputs and weights, no
    gradients yet), in MB: activations, workspaces and the gradients themselves."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e6


# ----- launch-shape sweep (tuning aid) ---------------------------------------------------------------


def sweep(args, device, budget) -> dict:
    """Triton launch shapes around the defaults (graph-timed decode, packed at 2% of 65536 rows) and
    the parts of the training op, to see where its time goes."""
    from xbai_kernels.ops.triton import decode, packed, train

    results = {"decode": [], "packed": [], "train_parts": []}
    D = decode.DecodeConfig
    decode_plan = {
        (1536, 1): [D(16, 32, 128, 4, 4), D(16, 16, 256, 4, 3), D(16, 16, 128, 4, 4), D(16, 32, 256, 4, 3)],
        (5120, 16): [D(16, 64, 128, 4, 3), D(16, 64, 128, 4, 4), D(16, 32, 256, 4, 3)],
        (5120, 256): [D(64, 128, 128, 4, 3, False), D(64, 128, 128, 4, 3)],
        (5120, 1024): [D(128, 128, 128, 8, 3, False), D(128, 128, 128, 8, 3), D(128, 128, 64, 8, 3, False)],
    }
    for (d, batch), configs in decode_plan.items():
        heads = weight_copies(d, device)
        for steps in (max(1, batch // 4), 0):
            sets = decode_sets(batch, d, steps, heads, device, seed=batch + steps)
            for cfg in configs[: 2 if steps == 0 else None]:
                if not budget.allows(10):
                    break
                call = lambda h, m, w1, b1, w2, b2, out, cfg=cfg: decode.head_logits_masked(h, m, w1, b1, w2, b2, out=out, config=cfg)
                entry = {"d": d, "B": batch, "step_rows": steps, **cfg.__dict__}
                guarded(entry, "graph_us", lambda: graph_us(call, sets))
                results["decode"].append(entry)
                print(f"  sweep decode {entry}", flush=True)
        del heads
        torch.cuda.empty_cache()
    R = packed.RowsConfig
    packed_plan = {
        3584: [R(128, 256, 64, 8, 8, 3), R(128, 128, 64, 8, 8, 3), R(128, 128, 128, 8, 8, 3)],
        1536: [R(128, 128, 128, 8, 8, 3), R(128, 128, 128, 8, 8, 4), R(128, 64, 256, 8, 4, 3)],
    }
    for d, configs in packed_plan.items():
        heads = weight_copies(d, device)
        g = torch.Generator(device=device).manual_seed(d)
        hidden = torch.randn(args.tokens, d, device=device, dtype=DTYPE, generator=g)
        rows = (torch.rand(args.tokens, device=device, generator=g) < args.step_fractions[0]).nonzero().squeeze(-1)
        arg_sets = [(hidden, rows, w) for w in heads]
        for cfg in configs:
            if not budget.allows(10):
                break
            entry = {"d": d, "n": int(rows.numel()), **cfg.__dict__}
            guarded(entry, "us", lambda cfg=cfg: median_us(Rotation(
                lambda h, r, w: packed.head_logits_rows(h, r, *w, config=cfg), arg_sets)))
            results["packed"].append(entry)
            print(f"  sweep packed {entry}", flush=True)
        del heads, hidden
        torch.cuda.empty_cache()
    results["train_parts"] = train_parts(device, budget, train, packed, R)
    return results


def train_parts(device, budget, train, packed, R, n: int = 4096, d: int = 5120) -> list[dict]:
    """Times of the training op's pieces at n x d: fused forward (launch shapes, dropout on/off),
    the backward kernel, and the cuBLAS products it relies on."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(4 * n, d, device=device, dtype=DTYPE, generator=g)
    rows = torch.randperm(4 * n, device=device, generator=g)[:n].sort().values
    w1, b1, w2, b2 = random_head(d, device, g)
    act = torch.empty(n, 2 * d, device=device, dtype=DTYPE)
    seed = train.draw_seed(device, g)
    parts = []

    def add(name, fn, **extra):
        if not budget.allows(8):
            return
        entry = {"part": name, **extra}
        guarded(entry, "us", lambda: median_us(fn))
        parts.append(entry)
        print(f"  train part {entry}", flush=True)

    for cfg in (R(128, 256, 64, 8, 8, 3), R(128, 256, 64, 8, 8, 4)):
        add("forward_dropout", lambda cfg=cfg: packed.launch_rows_head(
            hidden, rows, w1, b1, w2.view(-1), b2, act=act, seed=seed, dropout_p=0.5, config=cfg), **cfg.__dict__)
    add("forward_no_dropout", lambda: packed.launch_rows_head(
        hidden, rows, w1, b1, w2.view(-1), b2, act=act, config=R(128, 256, 64, 8, 8, 3)))
    grad = torch.randn(n, device=device, generator=g)
    parts_w = [p.requires_grad_() for p in (w1, b1, w2, b2)]
    hidden.requires_grad_()

    def fwd_bwd():
        hidden.grad = None
        for p in parts_w:
            p.grad = None
        logits = train.RowsHeadDropout.apply(hidden, rows, *parts_w[:2], w2, b2, seed, 0.5, 1e-4)
        logits.backward(grad)

    add("forward_backward_op", fwd_bwd)
    x = hidden.detach().index_select(0, rows)
    add("cublas_x_w1t", lambda: x @ w1.detach().t())
    dpre = torch.randn(n, 2 * d, device=device, dtype=DTYPE, generator=g)
    add("cublas_dpre_t_x", lambda: dpre.t() @ x)
    add("cublas_dpre_w1", lambda: dpre @ w1.detach())
    add("index_select_rows", lambda: hidden.detach().index_select(0, rows))
    add("zeros_index_add", lambda: torch.zeros_like(hidden).index_add_(0, rows, x))
    return parts


# ----- report ------------------------------------------------------------------------------------


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))


def _line(kind: str, row: dict) -> str:
    keys = [k for k in row if k not in _NOT_COLUMNS]
    return f"{kind:>6} " + " ".join(f"{k}={_fmt(row[k])}" for k in keys)


_NOT_COLUMNS = ("errors", "min_max")
_SHAPE_KEYS = {"decode": ("d", "B", "step_rows"), "packed": ("d", "T", "n"), "rows": ("d", "B", "rows"),
               "train": ("n", "d", "dropout_p")}


def markdown_table(result: dict) -> str:
    """One table per section: shape, floor, and every timed column (us; *_peak_MB in MB)."""
    env = result["environment"]
    parts = [f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; "
             f"copy {result['ceilings']['copy_Bps'] / 1e12:.2f} TB/s, bf16 matmul {result['ceilings']['matmul_flops'] / 1e12:.0f} TFLOP/s. "
             "Times are medians in us (each column's min and max are in the JSON, under min_max)."]
    for section, keys in _SHAPE_KEYS.items():
        rows = result.get(section) or []
        if not rows:
            continue
        columns = []
        for row in rows:
            for k in row:
                if k not in keys and k not in _NOT_COLUMNS and k not in columns:
                    columns.append(k)
        header = [*keys, *columns]
        lines = [f"**{section}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            lines.append("| " + " | ".join(_fmt(row.get(k)) for k in header) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(result: dict, path) -> None:
    """Bar charts (log time) of each section's columns, one group of bars per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in _SHAPE_KEYS if result.get(s)]
    fig, axes = plt.subplots(len(sections), 1, figsize=(13, 4.2 * len(sections)), squeeze=False)
    for ax, section in zip(axes[:, 0], sections):
        rows = result[section]
        keys = _SHAPE_KEYS[section]
        columns = [c for row in rows for c in row if c not in keys and c != "errors" and not c.endswith("_MB")
                   and not c.startswith("floor_") and "_vs_" not in c and isinstance(row.get(c), (float, int, type(None)))]
        columns = sorted(set(columns) | {"floor_us"}, key=lambda c: (c != "floor_us", c))
        width = 0.8 / len(columns)
        for j, column in enumerate(columns):
            # A zero-byte floor (no step row) has no bar on a log axis.
            values = [row.get(column) if (row.get(column) or 0) > 0.01 else float("nan") for row in rows]
            ax.bar([i + j * width for i in range(len(rows))], values, width, label=column)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_xticklabels(["\n".join(f"{k}={row[k]}" for k in keys) for row in rows], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("us (median)")
        ax.set_title(f"{section} - {result['environment']['device']}")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main --------------------------------------------------------------------------------------


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes, shorter timing windows, torch.compile at one decode shape only")
    parser.add_argument("--sweep", action="store_true", help="also time Triton launch shapes around the defaults")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--sections", default="decode,packed,rows,train")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds after which optional work is skipped")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--step-fractions", default="0.02,0.2", help="packed: shares of the T tokens that are steps")
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>-kernels.json)")
    args = parser.parse_args(argv)
    args.step_fractions = tuple(float(f) for f in args.step_fractions.split(","))
    if not torch.cuda.is_available():
        print("python -m benchmarks kernels: needs a CUDA GPU; nothing to time here")
        return None
    if args.quick:
        TIMING.update(warmup_ms=10, rep_ms=30)
        args.decode_d, args.decode_b = (1536, 5120), (1, 256)
        args.packed_d = (5120,)
        args.rows_d, args.rows_b = (5120,), (16, 1024)
        args.train_shapes = ((1024, 1536),)
        # One compile: each torch.compile costs seconds to tens of seconds, more than all the timing.
        args.compile_decode, args.compile_packed, args.compile_train = {(5120, 256)}, set(), set()
    else:
        args.decode_d, args.decode_b = (1536, 3584, 5120), (1, 16, 64, 256, 1024)
        args.packed_d = (1536, 3584, 5120)
        args.rows_d, args.rows_b = (1536, 3584, 5120), ROWS_B
        args.train_shapes = ((1024, 1536), (4096, 5120))
        args.compile_decode = {(d, b) for d in args.decode_d for b in args.decode_b}
        args.compile_packed, args.compile_train = set(args.packed_d), set(args.train_shapes)
    device = torch.device("cuda")
    budget = Budget(args.budget)
    env = environment(device)
    ceilings = {"copy_Bps": copy_bandwidth(device), "matmul_flops": matmul_rate(device)}
    print(f"{env['device']}: copy {ceilings['copy_Bps'] / 1e12:.2f} TB/s, bf16 matmul {ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    sections = [s for s in args.sections.split(",") if s]
    # A sweep-only file is a tuning record, not a results table: report.py renders only "kernels".
    name = "kernels" if sections else "kernels-sweep"
    result = {
        "benchmark": name, "environment": env, "ceilings": ceilings, "quick": args.quick,
        "timing": {**TIMING, "statistic": "median of triton.testing.do_bench (CUDA events)"},
        "decode_step_fractions": list(DECODE_STEP_FRACTIONS),
    }
    runners = {"decode": decode_cases, "packed": packed_cases, "rows": rows_cases, "train": train_cases}
    for section in sections:
        started = time.monotonic()
        try:
            result[section] = runners[section](args, device, ceilings, budget)
        except Exception as exc:  # keep what the other sections measured
            result.setdefault("errors", {})[section] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"== kernels {section}: {time.monotonic() - started:.0f} s", flush=True)
    if args.sweep:
        result["sweep"] = sweep(args, device, budget)
    # A quick run never overwrites the full results the README shows.
    default_name = f"{env['device_slug']}-{name}{'-quick' if args.quick else ''}.json"
    write_result(result, args.out, default_name, plot)
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
