"""The single point that picks a backend for an op.

Backends are modules exposing the op names of ``ops.reference`` (the contract). The choice:

* ``XBAI_KERNELS_BACKEND=reference|triton|cuda`` forces one; a forced backend that cannot run
  on the tensor's device, or lacks the op, is an error naming why.
* Otherwise a CUDA tensor takes the fastest backend measured for the op (docs/kernels.md):
  ``triton`` first, except the decode scorer's per-token ops, where the compiled module's lower
  launch cost wins; a CPU tensor takes ``reference``. A fast backend that is missing on a CUDA
  tensor, or that refuses the call's inputs (the head's ``HeadInputs``: the CUDA kernels take only
  fp16/bf16 with d a multiple of 8, no kernel has a backward), falls back to the next one, the last
  being ``reference``, and says so once in the log; ``XBAI_KERNELS_STRICT=1`` turns a fallback to
  ``reference`` into an error.

This is the only place that routes. A backend runs the inputs it is given or raises; each
(op, device, head inputs, settings) is decided once and cached.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Callable, NamedTuple

import torch

logger = logging.getLogger("xbai_kernels")

BACKENDS = ("reference", "triton", "cuda")
_MODULES = {
    "reference": "xbai_kernels.ops.reference",
    "triton": "xbai_kernels.ops.triton",
    "cuda": "xbai_kernels.ops.cuda",
}
_AUTO_ORDER_CUDA = ("triton", "cuda", "reference")
# The decode scorer's three per-token ops prefer the compiled module: called from Python, its launch
# costs a few microseconds against Triton's tens (H200: the decode head's eager call 6 us without step
# rows against Triton's 63-147 us), and in graph replay its decode head is as fast as Triton's up to
# 16 rows (docs/kernels.md). Elsewhere Triton is faster (the packed CUDA kernel is 4x slower).
_DECODE_ORDER = ("cuda", "triton", "reference")
_AUTO_ORDER_BY_OP = {op: _DECODE_ORDER for op in ("head_logits_masked", "decode_candidates", "decode_record")}


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here; the message says why."""


class HeadInputs(NamedTuple):
    """What decides which backend can run a head op: the dtype that ``hidden`` and all four weights
    share (None when they differ), the hidden size d, and whether autograd has to see the call."""

    dtype: torch.dtype | None
    hidden_size: int
    grad: bool


# The head ops and where their weights (W1, b1, W2, b2) start among the positional arguments.
_HEAD_WEIGHTS_AT = {"head_logits": 1, "head_logits_rows": 2, "head_logits_masked": 2}


def needs_autograd(hidden: torch.Tensor, weights) -> bool:
    """Whether autograd must see a head call on ``hidden`` with ``weights`` (W1, b1, W2, b2)."""
    w1, b1, w2, b2 = weights
    return torch.is_grad_enabled() and (
        hidden.requires_grad or w1.requires_grad or b1.requires_grad or w2.requires_grad or b2.requires_grad
    )


def head_inputs(hidden: torch.Tensor, weights) -> HeadInputs:
    """The ``HeadInputs`` of a call on ``hidden`` [N, d] with head ``weights`` (W1, b1, W2, b2)."""
    # Spelled out rather than with all()/any(): the decode scorer asks after every sampled token.
    w1, b1, w2, b2 = weights
    dtype = hidden.dtype
    if not (w1.dtype is dtype and b1.dtype is dtype and w2.dtype is dtype and b2.dtype is dtype):
        dtype = None
    return HeadInputs(dtype, hidden.shape[-1], needs_autograd(hidden, weights))


def forced_backend(value: str | None = None) -> str | None:
    """The backend ``XBAI_KERNELS_BACKEND`` (or ``value``) forces, None for auto."""
    name = (os.environ.get("XBAI_KERNELS_BACKEND", "") if value is None else value).strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"XBAI_KERNELS_BACKEND={name!r} is not one of {', '.join(BACKENDS)} or 'auto'")
    return name


def strict(value: str | None = None) -> bool:
    """Whether ``XBAI_KERNELS_STRICT`` (or ``value``) turns fallbacks to reference into errors."""
    return (os.environ.get("XBAI_KERNELS_STRICT", "0") if value is None else value) not in ("", "0", "false", "False")


@functools.cache
def _load(name: str) -> ModuleType | str:
    """The backend module, or a string saying why it cannot be imported."""
    try:
        return importlib.import_module(_MODULES[name])
    except Exception as exc:  # an optional backend may fail in any way at import (missing triton, no _C)
        return f"{type(exc).__name__}: {exc}"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run ops on ``device``, else why not."""
    module = _load(name)
    if isinstance(module, str):
        return f"the {name} backend failed to import ({module})"
    if name == "reference":
        return None
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1), got {device}"
    if name == "cuda" and device.type != "cuda":
        return f"the CUDA backend needs a CUDA device, got {device}"
    return module.unavailable_reason() if hasattr(module, "unavailable_reason") else None


@functools.cache
def _say_once(message: str, level: int) -> None:
    logger.log(level, message)


def resolve(op: str, device: torch.device, inputs: HeadInputs | None = None) -> tuple[str, Callable]:
    """(backend name, implementation) of ``op`` for tensors on ``device``; a head op also needs the
    ``inputs`` it will be called with (``head_inputs``), since not every backend takes every dtype."""
    return _resolve(op, device, _inputs_of(op, inputs), *_settings())


def implementations(
    ops: tuple[str, ...], device: torch.device, inputs: HeadInputs | None = None
) -> tuple[Callable, ...]:
    """The implementation of each of ``ops`` on ``device`` (head ops for ``inputs``), reading the
    settings once (a lookup in ``os.environ`` costs about a microsecond, and the decode scorer
    resolves three ops per token)."""
    settings = _settings()
    return tuple(_resolve(op, device, _inputs_of(op, inputs), *settings)[1] for op in ops)


def _inputs_of(op: str, inputs: HeadInputs | None) -> HeadInputs | None:
    if op not in _HEAD_WEIGHTS_AT:
        return None  # one cache entry per op whatever the caller passed
    if inputs is None:
        raise TypeError(f"dispatch: {op} is a head op, resolve it with the HeadInputs of its call")
    return inputs


def _settings() -> tuple[str, str, str | None]:
    # The raw values; parsed inside the cache, so each op, device and setting is decided once.
    env = os.environ
    return env.get("XBAI_KERNELS_BACKEND", ""), env.get("XBAI_KERNELS_STRICT", "0"), env.get("TRITON_INTERPRET")


def _refusal(name: str, op: str, device: torch.device, inputs: HeadInputs | None) -> str | None:
    """None when backend ``name`` runs ``op`` on ``device`` for ``inputs``, else why not."""
    reason = unavailable_reason(name, device)
    if reason is not None:
        return reason
    module = _load(name)
    if not hasattr(module, op):
        return f"the {name} backend has no {op!r} op"
    if inputs is not None and hasattr(module, "refuses"):
        return module.refuses(op, inputs)
    return None


@functools.cache
def _resolve(
    op: str, device: torch.device, inputs: HeadInputs | None, backend_setting: str, strict_setting: str, _interpret
) -> tuple[str, Callable]:
    forced, strict_mode = forced_backend(backend_setting), strict(strict_setting)
    if forced is not None:
        reason = _refusal(forced, op, device, inputs)
        if reason is not None:
            raise BackendUnavailable(f"XBAI_KERNELS_BACKEND={forced}: {reason}")
        _say_once(f"xbai_kernels: {op} uses the {forced} backend (forced)", logging.INFO)
        return forced, getattr(_load(forced), op)

    if device.type != "cuda":
        return "reference", getattr(_load("reference"), op)
    reasons = []
    for name in _AUTO_ORDER_BY_OP.get(op, _AUTO_ORDER_CUDA):
        reason = _refusal(name, op, device, inputs)
        if reason is None:
            if name == "reference":
                what = op if inputs is None else f"{op} ({_describe(inputs)})"
                message = f"xbai_kernels: {what} falls back to the reference path on {device}: " + "; ".join(reasons)
                if strict_mode:
                    raise BackendUnavailable(message + " (XBAI_KERNELS_STRICT=1)")
                _say_once(message, logging.WARNING)
            else:
                _say_once(f"xbai_kernels: {op} uses the {name} backend on {device}", logging.INFO)
            return name, getattr(_load(name), op)
        reasons.append(reason)
    raise AssertionError("unreachable: the reference backend always resolves")


def _describe(inputs: HeadInputs) -> str:
    dtype = "mixed dtypes" if inputs.dtype is None else str(inputs.dtype).removeprefix("torch.")
    return f"{dtype}, d={inputs.hidden_size}" + (", with autograd" if inputs.grad else "")


def call(op: str, device: torch.device, *args, **kwargs):
    """Run ``op`` on the backend chosen for ``device`` (and, for a head op, for its inputs)."""
    at = _HEAD_WEIGHTS_AT.get(op)
    inputs = None if at is None else head_inputs(args[0], args[at : at + 4])
    return _resolve(op, device, inputs, *_settings())[1](*args, **kwargs)
