"""Triton backend of the SPRM ops: the contract of ``ops.reference``, on GPU tensor cores.

Five kernel families, one file each: ``decode`` (the in-decode scorer, ``head_logits_masked``),
``record`` (its per-step bookkeeping, ``decode_candidates`` and ``decode_record``), ``packed``
(``head_logits``, ``head_logits_rows``: rows gathered in the kernel), ``steps`` (the packed
scorer's bookkeeping: ``step_mask``, ``find_steps``, ``trajectory_scores``) and ``train``
(``sprm_head_loss``: fused forward with dropout and its backward). On a machine without a GPU the
kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this import.
"""

from __future__ import annotations

import torch

from ._launch import interpreting
from .decode import head_logits_masked
from .packed import head_logits_rows
from .record import decode_candidates, decode_record, engine_step_rows
from .steps import find_steps, step_mask, trajectory_scores
from .train import sprm_head_loss

__all__ = [
    "decode_candidates",
    "decode_record",
    "engine_step_rows",
    "find_steps",
    "head_logits",
    "head_logits_masked",
    "head_logits_rows",
    "sprm_head_loss",
    "step_mask",
    "refuses",
    "trajectory_scores",
    "unavailable_reason",
]

# bf16 tensor-core dots need Ampere or newer.
_MIN_CAPABILITY = (8, 0)


def head_logits(hidden: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """logit of every row: hidden [N, d] -> float32 [N] (the packed kernel over rows 0..N-1)."""
    rows = torch.arange(hidden.shape[0] if hidden.dim() == 2 else 0, device=hidden.device)
    return head_logits_rows(hidden, rows, w1, b1, w2, b2)


def refuses(op: str, inputs) -> str | None:
    """Why a head op cannot run here for these ``dispatch.HeadInputs``, or None: the inference
    kernels take any float dtype and size but have no backward (training has ``sprm_head_loss``)."""
    return "inputs that require grad (the Triton inference kernels have no backward)" if inputs.grad else None


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else why not (dispatch checks the tensor's device)."""
    if interpreting():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is visible (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
    capability = torch.cuda.get_device_capability()
    if capability < _MIN_CAPABILITY:
        return f"the Triton kernels need compute capability >= 8.0, this GPU has {capability[0]}.{capability[1]}"
    return None
