"""Benchmark mode: the plugin's own host time, by stage, in each vLLM process (``XBAI_SPRM_PROFILE=1``).

Off by default; the hooks then cost one module-attribute read. On, each stage adds its wall time and
call count (thread CPU time, ``now``), and ``snapshot`` reads them (``benchmarks/bench_vllm.py`` fetches the engine core's
through ``collective_rpc``, which runs in the process that holds the scheduler and the worker).
"""

from __future__ import annotations

import os
import time

# CPU time of the calling thread: a wall clock would also count the time another thread of the
# process holds the GIL in the middle of a stage (the engine's output thread, the front end's
# socket thread), which is not the plugin's cost.
now = time.thread_time_ns

ENABLED = os.environ.get("XBAI_SPRM_PROFILE", "0").strip() not in ("", "0")
_totals: dict[str, list[int]] = {}


def add(stage: str, nanoseconds: int, calls: int = 1) -> None:
    total = _totals.setdefault(stage, [0, 0])
    total[0] += nanoseconds
    total[1] += calls


def set_enabled(_worker=None, enabled: bool = True) -> bool:
    """Switch the hooks on or off in this process (a ``collective_rpc`` function too); returns the
    previous setting. Benchmarks time throughput with the hooks off: their clock reads are a system
    call each, which a loaded machine may turn into a reschedule."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(enabled)
    return previous


def snapshot(_worker=None, reset: bool = False) -> dict[str, tuple[int, int]]:
    """{stage: (nanoseconds, calls)} of this process; callable as a ``collective_rpc`` function."""
    result = {stage: (ns, calls) for stage, (ns, calls) in _totals.items()}
    if reset:
        _totals.clear()
    return result
