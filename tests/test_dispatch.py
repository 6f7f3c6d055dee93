"""The single dispatch point: forced backends, the automatic choice, the logged fallback and strict mode."""

from __future__ import annotations

import logging

import pytest
import torch

from xbai_kernels.ops import dispatch, reference

CPU = torch.device("cpu")
BF16 = dispatch.HeadInputs(torch.bfloat16, 64, grad=False)
# A CUDA device object can be named without a GPU: the fast backends must then decline it.
CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("XBAI_KERNELS_BACKEND", "XBAI_KERNELS_STRICT", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)


def test_cpu_tensors_take_the_reference_path():
    assert dispatch.resolve("head_logits", CPU, BF16) == ("reference", reference.head_logits)


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "reference")
    name, impl = dispatch.resolve("head_logits_masked", CPU, BF16)
    assert name == "reference" and impl is reference.head_logits_masked


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forced_fast_backend_that_cannot_run_is_an_error(monkeypatch, backend):
    if torch.cuda.is_available():
        pytest.skip("this machine can run the fast backends")
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", backend)
    with pytest.raises(dispatch.BackendUnavailable, match=f"XBAI_KERNELS_BACKEND={backend}"):
        dispatch.resolve("head_logits", CPU, BF16)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="not one of reference, triton, cuda"):
        dispatch.resolve("head_logits", CPU, BF16)


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
            name, _ = dispatch.resolve("head_logits_rows", CUDA, BF16)
    assert name == "reference"
    fallbacks = [r for r in caplog.records if "falls back to the reference path" in r.getMessage()]
    assert len(fallbacks) == 1, "the fallback is said once"
    monkeypatch.setenv("XBAI_KERNELS_STRICT", "1")
    with pytest.raises(dispatch.BackendUnavailable, match="XBAI_KERNELS_STRICT=1"):
        dispatch.resolve("head_logits_rows", CUDA, BF16)


def test_a_head_op_is_resolved_for_its_inputs():
    with pytest.raises(TypeError, match="head_logits_rows is a head op"):
        dispatch.resolve("head_logits_rows", CPU)
    # Other ops ignore inputs: one decision per op.
    assert dispatch.resolve("step_mask", CPU, BF16) == dispatch.resolve("step_mask", CPU)


def test_head_inputs_of_a_call():
    hidden = torch.zeros(3, 40, dtype=torch.bfloat16)
    head = [torch.zeros(80, 40, dtype=torch.bfloat16), torch.zeros(80, dtype=torch.bfloat16),
            torch.zeros(1, 80, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)]
    assert dispatch.head_inputs(hidden, head) == (torch.bfloat16, 40, False)
    assert dispatch.head_inputs(hidden.float(), head) == (None, 40, False)
    head[0].requires_grad_()
    assert dispatch.head_inputs(hidden, head).grad
    with torch.no_grad():
        assert not dispatch.head_inputs(hidden, head).grad


@pytest.fixture
def every_backend_runs(monkeypatch):
    """Routing as on a GPU machine where every backend is installed, on this CPU: only the inputs
    decide (the backends' ``refuses``)."""
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, device: None)
    dispatch._resolve.cache_clear()
    dispatch._say_once.cache_clear()
    yield
    dispatch._resolve.cache_clear()


@pytest.mark.parametrize(
    ("inputs", "decode_op", "packed_op"),
    [
        (dispatch.HeadInputs(torch.bfloat16, 1536, False), "cuda", "triton"),
        (dispatch.HeadInputs(torch.float16, 64, False), "cuda", "triton"),
        # The CUDA kernels take 16-bit inputs with d a multiple of 8; Triton takes any float input.
        (dispatch.HeadInputs(torch.float32, 1536, False), "triton", "triton"),
        (dispatch.HeadInputs(None, 1536, False), "triton", "triton"),
        (dispatch.HeadInputs(torch.bfloat16, 59, False), "triton", "triton"),
        # No kernel has a backward: autograd gets the reference path, which it can differentiate.
        (dispatch.HeadInputs(torch.bfloat16, 1536, True), "reference", "reference"),
    ],
)
def test_the_router_sends_each_input_to_a_backend_that_takes_it(every_backend_runs, inputs, decode_op, packed_op):
    assert dispatch.resolve("head_logits_masked", CUDA, inputs)[0] == decode_op
    assert dispatch.resolve("head_logits_rows", CUDA, inputs)[0] == packed_op
    assert dispatch.resolve("head_logits", CUDA, inputs)[0] == packed_op


def test_a_forced_backend_that_refuses_the_inputs_says_why(every_backend_runs, monkeypatch):
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="XBAI_KERNELS_BACKEND=cuda: float32 inputs"):
        dispatch.resolve("head_logits_masked", CUDA, dispatch.HeadInputs(torch.float32, 64, False))
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "triton")
    with pytest.raises(dispatch.BackendUnavailable, match="no backward"):
        dispatch.resolve("head_logits_rows", CUDA, dispatch.HeadInputs(torch.float32, 64, True))
    assert dispatch.resolve("head_logits_rows", CUDA, dispatch.HeadInputs(torch.float32, 64, False))[0] == "triton"


def test_the_autograd_fallback_is_logged_with_its_inputs(every_backend_runs, caplog):
    with caplog.at_level(logging.WARNING, logger="xbai_kernels"):
        dispatch.resolve("head_logits", CUDA, dispatch.HeadInputs(torch.bfloat16, 1536, True))
    (message,) = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert "head_logits (bfloat16, d=1536, with autograd)" in message and "no backward" in message


def test_the_triton_kernels_refuse_autograd_instead_of_cutting_the_graph():
    pytest.importorskip("triton")
    from xbai_kernels.ops.triton import _launch

    weights = [torch.zeros(8, 4, requires_grad=True), torch.zeros(8), torch.zeros(1, 8), torch.zeros(1)]  # W1, b1, W2, b2
    with pytest.raises(ValueError, match="head_logits_rows: the Triton backend has no backward"):
        _launch.refuse_autograd("head_logits_rows", torch.zeros(2, 4), weights)
    with torch.no_grad():
        _launch.refuse_autograd("head_logits_rows", torch.zeros(2, 4), weights)
