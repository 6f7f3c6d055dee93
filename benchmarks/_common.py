"""What every benchmark result carries: the machine and versions it ran on, written as JSON."""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

MODEL_SHAPES = {
    # Qwen2 shapes of the released 1.5B and 7B models, and a tiny one for CPU runs.
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1024),
}


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(device: torch.device) -> dict:
    """Device name, driver, torch/triton/CUDA versions, date: the header of every results file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": name,
        "device_slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if device.type == "cuda" else "cpu",
        "driver": _driver_version() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus written (median of ``repeats``):
    the memory ceiling every floor in this suite is computed from."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def write_result(result: dict, path: str | None, default_name: str, plot=None) -> Path:
    """Write ``result`` as JSON (to ``path``, else results/``default_name``) and, given ``plot(result,
    png_path)``, its plot beside it. A plot that fails is reported, not raised: the JSON is the record."""
    target = Path(path) if path else RESULTS_DIR / default_name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")
    if plot is not None:
        try:
            plot(result, target.with_suffix(".png"))
        except Exception as exc:  # the plot is a convenience
            print(f"plot skipped: {exc}")
    return target


def progress(items: Iterable, desc: str, label: Callable[[object], str] = str) -> Iterator:
    """Yield ``items``, showing how far a long run is, on stderr (stdout keeps the results).

    A tqdm bar when stderr is a terminal and tqdm is importable; otherwise one line per item
    (``[desc k/n, t s] label``), so a log of a run on a remote machine still shows where it was.
    """
    items = list(items)
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True)
            for item in bar:
                bar.set_postfix_str(label(item), refresh=False)
                yield item
            return
    start = time.monotonic()
    for k, item in enumerate(items, 1):
        print(f"[{desc} {k}/{len(items)}, {time.monotonic() - start:.0f} s] {label(item)}", file=sys.stderr, flush=True)
        yield item
