"""``python -m benchmarks [SUITE] [ARGS...]``: run one benchmark suite, or the default ones.

SUITE names a module of this package: ``report`` (benchmarks/report.py) or ``bench_<SUITE>``
(``kernels`` -> bench_kernels.py, ``e2e`` -> bench_e2e.py, ...), whose ``main(argv)`` gets ARGS.
Without a SUITE (ARGS may start with options such as ``--quick``) the default suites run in turn.
"""

from __future__ import annotations

import importlib
import sys
import time

# What `python -m benchmarks --quick` (the Makefile's `make bench`) runs.
DEFAULT_SUITES = ("kernels", "e2e")


def _module(suite: str):
    name = "report" if suite == "report" else f"bench_{suite}"
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.{name}":
            raise SystemExit(f"python -m benchmarks: no suite {suite!r} (no benchmarks/{name}.py)") from None
        raise


def main(argv: list[str]) -> None:
    if argv and not argv[0].startswith("-"):
        _module(argv[0]).main(argv[1:])
        return
    started = time.monotonic()
    for suite in DEFAULT_SUITES:
        print(f"== python -m benchmarks {suite} {' '.join(argv)}", flush=True)
        _module(suite).main(list(argv))
        print(f"== {suite} done, {time.monotonic() - started:.0f} s since the start", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
