"""Benchmark suites of xbai-kernels; run one with ``python -m benchmarks SUITE [ARGS]``."""
