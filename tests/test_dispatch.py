"""The single dispatch point: forced backends, the automatic choice, the logged fallback and strict mode."""

from __future__ import annotations

import logging

import pytest
import torch

from xbai_kernels.ops import dispatch, reference

CPU = torch.device("cpu")
# A CUDA device object can be named without a GPU: the fast backends must then decline it.
CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("XBAI_KERNELS_BACKEND", "XBAI_KERNELS_STRICT", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)


def test_cpu_tensors_take_the_reference_path():
    assert dispatch.resolve("head_logits", CPU) == ("reference", reference.head_logits)


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "reference")
    name, impl = dispatch.resolve("head_logits_masked", CPU)
    assert name == "reference" and impl is reference.head_logits_masked


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forced_fast_backend_that_cannot_run_is_an_error(monkeypatch, backend):
    if torch.cuda.is_available():
        pytest.skip("this machine can run the fast backends")
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", backend)
    with pytest.raises(dispatch.BackendUnavailable, match=f"XBAI_KERNELS_BACKEND={backend}"):
        dispatch.resolve("head_logits", CPU)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="not one of reference, triton, cuda"):
        dispatch.resolve("head_logits", CPU)


def test_forced_backend_without_the_op(monkeypatch):
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "reference")
    with pytest.raises(dispatch.BackendUnavailable, match="has no 'no_such_op' op"):
        dispatch.resolve("no_such_op", CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the fast backends decline CUDA")
def test_cuda_fallback_is_logged_once_and_strict_makes_it_an_error(monkeypatch, caplog):
    dispatch._resolve.cache_clear()
    dispatch._say_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="xbai_kernels"):
        for _ in range(3):
            name, _ = dispatch.resolve("head_logits_rows", CUDA)
    assert name == "reference"
    fallbacks = [r for r in caplog.records if "falls back to the reference path" in r.getMessage()]
    assert len(fallbacks) == 1, "the fallback is said once"
    monkeypatch.setenv("XBAI_KERNELS_STRICT", "1")
    with pytest.raises(dispatch.BackendUnavailable, match="XBAI_KERNELS_STRICT=1"):
        dispatch.resolve("head_logits_rows", CUDA)
