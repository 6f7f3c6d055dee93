"""Copies between pinned host memory and the device done by a kernel, not by the copy engine.

Inside a CUDA graph, a host<->device memcpy node and its hand-offs to and from the kernels around it
cost several microseconds each (H100: a four-node graph of two memcpy nodes and two small kernels
took 24.5 us against 12 us for the nodes alone). Pinned host memory is mapped into the device's
address space, so a kernel can load from and store to it directly, and a chain of kernels has no
such hand-off. Used by the vLLM recorder for the few hundred bytes a step moves each way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, keep_ptr, n, keep_start, fill, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    values = tl.load(src_ptr + offsets, mask=inside)
    if HAS_KEEP:
        tail = inside & (offsets >= keep_start)
        kept = tl.load(keep_ptr + offsets - keep_start, mask=tail, other=1) != 0
        values = tl.where(kept, values, fill)
    tl.store(dst_ptr + offsets, values, mask=inside)


def copy_int32(src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor | None = None, fill: int = 0) -> None:
    """dst[:] = src for contiguous int32 tensors of one size, either of them pinned host memory.

    With ``keep`` (bool [k], k <= n, on the device), the last k elements become ``fill`` where
    ``keep`` is False, in the same pass (the vLLM recorder marks rows that keep no logit so)."""
    if src.dtype != torch.int32 or dst.dtype != torch.int32 or src.numel() != dst.numel():
        raise ValueError(f"copy_int32: needs two int32 tensors of one size, got {src.dtype} {tuple(src.shape)} and "
                         f"{dst.dtype} {tuple(dst.shape)}")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("copy_int32: both tensors must be contiguous")
    n = src.numel()
    if keep is not None and (keep.dtype != torch.bool or keep.dim() != 1 or keep.numel() > n or not keep.is_contiguous()):
        raise ValueError(f"copy_int32: keep must be a contiguous bool [k <= {n}], got {keep.dtype} {tuple(keep.shape)}")
    if n:
        keep_start = n - keep.numel() if keep is not None else n
        _copy_kernel[(triton.cdiv(n, _BLOCK),)](
            src, dst, keep.view(torch.int8) if keep is not None else src, n, keep_start, fill,
            HAS_KEEP=keep is not None, BLOCK=_BLOCK,
        )
