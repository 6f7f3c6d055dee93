"""Input checks shared by every public entry: readable errors before any kernel sees the data."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    where: str,
    name: str,
    value,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``where`` and ``name`` if ``value`` is off."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{where}: {name} must be {want}, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{where}: {name} must have dtype in ({names}), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{where}: {name} is on {value.device} but the other inputs are on {device}")
    return value


def check_rows(where: str, device: torch.device, batch: int, dtypes=INDEX_DTYPES, **tensors) -> None:
    """Each of ``tensors`` is a contiguous 1-D [batch] tensor of ``dtypes`` on ``device``: the per-row
    inputs of one decode step, which kernels read by row index."""
    for name, tensor in tensors.items():
        check_tensor(where, name, tensor, ndim=1, dtypes=dtypes, device=device)
        if tensor.shape[0] != batch or not tensor.is_contiguous():
            raise ValueError(f"{where}: {name} must be a contiguous [{batch}] tensor, got shape {tuple(tensor.shape)}")


def check_cu_seqlens(where: str, cu_seqlens, total: int, device: torch.device) -> torch.Tensor:
    """Check the flash-attn varlen convention: int32 [S+1], starts at 0, non-decreasing, ends at ``total``.

    The check reads ``cu_seqlens`` on the host (it is tiny); callers that must not synchronize check
    the layout only, and those that synchronize anyway check the values they read then.
    """
    check_cu_seqlens_layout(where, cu_seqlens, device)
    check_cu_seqlens_values(where, cu_seqlens.tolist(), total)
    return cu_seqlens


def check_cu_seqlens_layout(where: str, cu_seqlens, device: torch.device) -> None:
    """What can be checked of ``cu_seqlens`` without reading it: a 1-D index tensor of >= 2 entries."""
    check_tensor(where, "cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{where}: cu_seqlens must hold at least 2 entries [0, ..., total], got {cu_seqlens.numel()}")


class CuSeqlensError(ValueError):
    """``cu_seqlens`` holds values that do not describe a packed batch. ``reason`` is the message
    without the name of the function that found it, so a public entry can report it as its own."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def check_cu_seqlens_values(where: str, host: list[int], total: int) -> None:
    """The values of ``cu_seqlens``, read on the host: start at 0, non-decreasing, end at ``total``."""
    if host[0] != 0:
        raise CuSeqlensError(where, f"cu_seqlens (the offsets of the packed sequences) must start at 0, got {host[0]}")
    if any(b < a for a, b in zip(host, host[1:])):
        raise CuSeqlensError(where, f"cu_seqlens (the offsets of the packed sequences) must be non-decreasing, got {host}")
    if host[-1] != total:
        raise CuSeqlensError(
            where, f"cu_seqlens (the offsets of the packed sequences) must end at the number of tokens {total}, got {host[-1]}"
        )


def check_row_count(where: str, num_rows, device: torch.device) -> None:
    """``num_rows``: an index tensor holding one count, on ``device`` (a live-row count read on the device)."""
    check_tensor(where, "num_rows", num_rows, dtypes=INDEX_DTYPES, device=device)
    if num_rows.numel() != 1:
        raise ValueError(f"{where}: num_rows must hold one count, got shape {tuple(num_rows.shape)}")


def check_head_weights(where: str, hidden: torch.Tensor, w1, b1, w2, b2) -> None:
    """Shapes [2d, d], [2d], [1, 2d], [1]; one floating dtype; same device as ``hidden``."""
    d = hidden.shape[-1]
    expected = {"w1": (2 * d, d), "b1": (2 * d,), "w2": (1, 2 * d), "b2": (1,)}
    for name, tensor in zip(expected, (w1, b1, w2, b2)):
        check_tensor(where, name, tensor, dtypes=FLOAT_DTYPES, device=hidden.device)
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{where}: head {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                f"for hidden size {d}"
            )
