"""The single point that picks a backend for an op.

Backends are modules exposing the op names of ``ops.reference`` (the contract). The choice:

* ``XBAI_KERNELS_BACKEND=reference|triton|cuda`` forces one; a forced backend that cannot run
  on the tensor's device, or lacks the op, is an error naming why.
* Otherwise a CUDA tensor takes the fastest backend measured for the op (docs/kernels.md):
  ``triton`` first, except the decode scorer's per-token ops, where the compiled module's lower
  launch cost wins; a CPU tensor takes ``reference``. A fast backend that is missing on a CUDA
  tensor falls back to the next one, the last being ``reference``, and says so once in the log;
  ``XBAI_KERNELS_STRICT=1`` turns a fallback to ``reference`` into an error.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Callable

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


def resolve(op: str, device: torch.device) -> tuple[str, Callable]:
    """(backend name, implementation) of ``op`` for tensors on ``device``."""
    return _resolve(op, device, *_settings())


def implementations(ops: tuple[str, ...], device: torch.device) -> tuple[Callable, ...]:
    """The implementation of each of ``ops`` on ``device``, reading the settings once (a lookup in
    ``os.environ`` costs about a microsecond, and the decode scorer resolves three ops per token)."""
    settings = _settings()
    return tuple(_resolve(op, device, *settings)[1] for op in ops)


def _settings() -> tuple[str, str, str | None]:
    # The raw values; parsed inside the cache, so each op, device and setting is decided once.
    env = os.environ
    return env.get("XBAI_KERNELS_BACKEND", ""), env.get("XBAI_KERNELS_STRICT", "0"), env.get("TRITON_INTERPRET")


@functools.cache
def _resolve(op: str, device: torch.device, backend_setting: str, strict_setting: str, _interpret) -> tuple[str, Callable]:
    forced, strict_mode = forced_backend(backend_setting), strict(strict_setting)
    if forced is not None:
        reason = unavailable_reason(forced, device)
        if reason is None and not hasattr(_load(forced), op):
            reason = f"the {forced} backend has no {op!r} op"
        if reason is not None:
            raise BackendUnavailable(f"XBAI_KERNELS_BACKEND={forced}: {reason}")
        _say_once(f"xbai_kernels: {op} uses the {forced} backend (forced)", logging.INFO)
        return forced, getattr(_load(forced), op)

    if device.type != "cuda":
        return "reference", getattr(_load("reference"), op)
    reasons = []
    for name in _AUTO_ORDER_BY_OP.get(op, _AUTO_ORDER_CUDA):
        reason = unavailable_reason(name, device)
        if reason is None and not hasattr(_load(name), op):
            reason = f"the {name} backend has no {op!r} op"
        if reason is None:
            if name == "reference":
                message = f"xbai_kernels: {op} falls back to the reference path on {device}: " + "; ".join(reasons)
                if strict_mode:
                    raise BackendUnavailable(message + " (XBAI_KERNELS_STRICT=1)")
                _say_once(message, logging.WARNING)
            else:
                _say_once(f"xbai_kernels: {op} uses the {name} backend on {device}", logging.INFO)
            return name, getattr(_load(name), op)
        reasons.append(reason)
    raise AssertionError("unreachable: the reference backend always resolves")


def call(op: str, device: torch.device, *args, **kwargs):
    """Run ``op`` on the backend chosen for ``device``."""
    return resolve(op, device)[1](*args, **kwargs)
