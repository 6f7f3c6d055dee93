"""``xbai-kernels bench``: time the package's public calls on this machine, as installed.

No source checkout is needed: the calls timed are the ones a user makes (the head on decode rows,
``DecodeScorer.step``, ``score_trajectories``, ``sprm_head_loss`` forward and backward), under each
backend that can run here, at the released model widths. Each timing is a median over windows of
back-to-back eager calls, with the min and max beside it: the spread says how far to trust it.

The results go to ``--out`` (default ``./xbai-kernels-bench``), one JSON file per run, never into the
package. The maintainers' suites (kernel floors, CUDA graphs, end-to-end decoding) live in the
repository's ``benchmarks/`` folder (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from .decode import DecodeScorer
from .head import SPRMHead
from .loss import sprm_head_loss
from .ops import dispatch
from .rule import StepRule
from .scoring import score_trajectories

DEFAULT_OUT = Path("xbai-kernels-bench")
CPU_NOTE = (
    "On a CPU only the reference path (plain PyTorch) runs: the Triton and CUDA kernels need an NVIDIA GPU, "
    "and these timings are the host's, bound by its noise (see each row's spread). Run on a GPU for kernel numbers."
)
RULE = StepRule(step_token_ids=(7,), think_start_id=1, think_end_id=2)


@contextlib.contextmanager
def forced_backend(name: str):
    """Run the block with ``XBAI_KERNELS_BACKEND=name`` (dispatch reads it on every call)."""
    previous = os.environ.get("XBAI_KERNELS_BACKEND")
    os.environ["XBAI_KERNELS_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("XBAI_KERNELS_BACKEND", None)
        else:
            os.environ["XBAI_KERNELS_BACKEND"] = previous


def time_call(fn: Callable[[], object], device: torch.device, windows: int, calls: int) -> dict:
    """Per-call seconds of ``fn``: median, min and max over ``windows`` windows of ``calls`` calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: first-call compilation (Triton JIT) and allocator growth are not the op's cost
    sync()
    per_call = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - start) / calls)
    return {"median_us": statistics.median(per_call) * 1e6, "min_us": min(per_call) * 1e6, "max_us": max(per_call) * 1e6}


def cases(device: torch.device, hidden_size: int, quick: bool) -> dict[str, Callable[[], object]]:
    """The timed calls at width ``hidden_size``: name -> a closure over ready inputs."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    head = SPRMHead(hidden_size).to(device=device, dtype=dtype).eval()
    batch, tokens = 16, (2048 if quick else 16384) if device.type == "cpu" else (8192 if quick else 65536)

    decode_hidden = torch.randn(batch, hidden_size, generator=generator).to(device, dtype)
    # Events past the capacity go to a trash column, so the scorer can record forever.
    scorer = DecodeScorer(head, RULE, num_slots=batch, capacity=64)
    slots = torch.arange(batch, device=device)
    positions = torch.full((batch,), 100, device=device)
    # A quarter of the rows sample the step token after a non-step token: alternate which quarter, so
    # the token before every step is the other call's non-step token.
    sampled = [torch.where(slots % 4 == quarter, 7, 11) for quarter in (0, 2)]
    calls = [0]

    def decode_step():
        calls[0] += 1
        scorer.step(decode_hidden, sampled[calls[0] % 2], slots, positions)

    ids = torch.randint(8, 500, (tokens,), generator=generator)
    ids[torch.randperm(tokens, generator=generator)[: tokens // 50]] = 7  # 2% of the tokens end a step
    ids = ids.to(device)
    packed_hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, dtype)

    rows = 256 if device.type == "cpu" else 4096
    train_hidden = torch.randn(1, rows, hidden_size, generator=generator).to(device, dtype).requires_grad_()
    train_mask = torch.ones(1, rows, dtype=torch.bool, device=device)
    rewards = torch.ones(1, device=device)
    train_head = SPRMHead(hidden_size).to(device=device, dtype=dtype).train()

    def train_step():
        loss, _ = sprm_head_loss(train_hidden, train_head, train_mask, rewards)
        loss.backward()

    return {
        "head, decode rows (B = 16)": lambda: head(decode_hidden),
        "DecodeScorer.step (B = 16, 4 step rows)": decode_step,
        f"score_trajectories (T = {tokens}, 2% steps)": lambda: score_trajectories(packed_hidden, ids, head, RULE),
        f"sprm_head_loss forward + backward (n = {rows})": train_step,
    }


def backends_here(device: torch.device) -> list[str]:
    return [name for name in dispatch.BACKENDS if dispatch.unavailable_reason(name, device) is None]


def run(out_dir: Path = DEFAULT_OUT, quick: bool = False, device: str | None = None, echo=print) -> Path:
    """Time every case under every backend that runs here; write and return the JSON file."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    widths = (1536,) if quick or device.type == "cpu" else (1536, 3584, 5120)
    windows, calls = (5, 3) if quick else (7, 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    echo(f"xbai-kernels bench on {name}, torch {torch.__version__}")
    if device.type == "cpu":
        echo(CPU_NOTE)
    rows = []
    for hidden_size in widths:
        timed = cases(device, hidden_size, quick)
        for backend in backends_here(device):
            with forced_backend(backend):
                for case, fn in timed.items():
                    try:
                        timing = time_call(fn, device, windows, calls)
                    except dispatch.BackendUnavailable as exc:
                        timing = {"error": str(exc)}
                    row = {"case": case, "d": hidden_size, "backend": backend, **timing}
                    rows.append(row)
                    echo(_row_text(row))
    result = {
        "benchmark": "ops",
        "environment": {"device": name, "torch": torch.__version__, "python": platform.python_version(),
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "note": CPU_NOTE if device.type == "cpu" else "eager calls from Python, host time included",
        "rows": rows,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["environment"]["date"].replace(":", "").replace("+0000", "Z")
    target = out_dir / f"ops-{device.type}-{stamp}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    echo(f"wrote {target}")
    return target


def _row_text(row: dict) -> str:
    if "error" in row:
        return f"  d={row['d']:<5} {row['backend']:<9} {row['case']}: {row['error']}"
    spread = (row["max_us"] - row["min_us"]) / row["median_us"] * 100
    return (
        f"  d={row['d']:<5} {row['backend']:<9} {row['case']}: {row['median_us']:9.1f} us "
        f"(min {row['min_us']:.1f}, max {row['max_us']:.1f}, spread {spread:.0f}%)"
    )
