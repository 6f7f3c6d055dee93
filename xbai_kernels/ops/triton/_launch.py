"""Host-side helpers shared by the Triton launchers: input checks, the dot dtype, block sizes, device guard.

Nothing here synchronizes with the device: every check reads tensor metadata only, so the decode
launcher stays capturable in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._validate import FLOAT_DTYPES, INDEX_DTYPES, check_head_weights, check_tensor
from .. import dispatch

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device otherwise)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class DotFormat:
    """How the head's first matmul runs: operand dtype, Triton's ``input_precision``, and the dtype
    in which [n, 2d] activations and their gradients are stored (``torch_dtype``)."""

    dtype: tl.dtype
    torch_dtype: torch.dtype
    precision: str


def dot_format(hidden: torch.Tensor, w1: torch.Tensor) -> DotFormat:
    """16-bit tensor cores when hidden and W1 share a 16-bit dtype; exact fp32 otherwise.

    fp32 (or mixed) inputs use ``ieee`` precision because the contract promises fp32 results for
    fp32 inputs, which tf32 (10-bit mantissa) would not give.
    """
    if hidden.dtype == w1.dtype and hidden.dtype in (torch.float16, torch.bfloat16):
        if hidden.dtype == torch.bfloat16 and interpreting():
            # Triton's CPU interpreter (3.9) returns garbage for bf16 x bf16 dots; bf16 -> fp32 is
            # exact and the GPU's bf16 dot accumulates exact products in fp32, so this is the same sum.
            return DotFormat(tl.float32, torch.bfloat16, "ieee")
        return DotFormat(_TL_DTYPES[hidden.dtype], hidden.dtype, "tf32")
    return DotFormat(tl.float32, torch.float32, "ieee")


def rows_last_contiguous(hidden: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (a slice of a larger buffer); elements inside a row must be contiguous."""
    return hidden if hidden.stride(-1) == 1 else hidden.contiguous()


def head_weights(where: str, hidden: torch.Tensor, w1, b1, w2, b2):
    """Check (shapes [2d, d], [2d], [1, 2d], [1], dtype, device) and return contiguous weights."""
    check_head_weights(where, hidden, w1, b1, w2, b2)
    return w1.contiguous(), b1.contiguous(), w2.contiguous().view(-1), b2.contiguous()


def refuse_autograd(where: str, hidden: torch.Tensor, weights) -> None:
    """The inference kernels have no backward: a call that autograd must see is an error, not a
    result silently cut from the graph (the router sends such calls to the reference path)."""
    if dispatch.needs_autograd(hidden, weights):
        raise ValueError(f"{where}: the Triton backend has no backward; call it under torch.no_grad()")


def check_hidden(where: str, hidden) -> None:
    check_tensor(where, "hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)


def check_rows(where: str, rows, device: torch.device) -> None:
    check_tensor(where, "rows", rows, ndim=1, dtypes=INDEX_DTYPES, device=device)


def next_pow2(value: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(int(value), 1)))


def sum_block(num_tiles: int) -> int:
    """Tiles summed per step of the fixed-order reduction (power of two, at most 32)."""
    return min(32, next_pow2(num_tiles, minimum=2))


def tma_capable(weight: torch.Tensor, fmt: DotFormat) -> bool:
    """Whether a TMA descriptor can carry ``weight`` (contiguous [rows, d]): 16-bit operands, 16-byte
    aligned base and row pitch, and a GPU with a tensor memory accelerator (Hopper or newer); the
    interpreter emulates descriptors, so CPU tests run the same kernel code."""
    if fmt.torch_dtype not in (torch.float16, torch.bfloat16) or weight.dtype != fmt.torch_dtype:
        return False
    if weight.data_ptr() % 16 or (weight.shape[1] * weight.element_size()) % 16:
        return False
    if interpreting():
        return True
    return weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device)[0] >= 9


@functools.cache
def _pdl_supported() -> bool:
    """Whether this Triton has programmatic dependent launch (the ``launch_pdl`` option, 3.4+)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    fields = {field.name for field in dataclasses.fields(CUDAOptions)}
    return "launch_pdl" in fields and hasattr(tl.extra.cuda, "gdc_wait")


@functools.cache
def _pdl_on(device: torch.device) -> bool:
    if os.environ.get("XBAI_KERNELS_TRITON_PDL", "1") in ("0", "false", "False") or interpreting():
        return False
    return device.type == "cuda" and _pdl_supported() and torch.cuda.get_device_capability(device)[0] >= 9


def chained(device: torch.device) -> dict:
    """Launch options that chain a kernel to the one before it on the stream by programmatic
    dependent launch (Hopper and newer): the launch overlaps the end of the previous kernel, and the
    kernel's ``chain_start`` waits for that kernel's writes before reading anything. In a CUDA graph
    a launch costs ~3 us of a step that may take 3-10 us in all, so a chain of small kernels gains
    about that much per link. ``XBAI_KERNELS_TRITON_PDL=0`` turns it off."""
    on = _pdl_on(device)
    return {"USE_PDL": on, "launch_pdl": True} if on else {"USE_PDL": False}
