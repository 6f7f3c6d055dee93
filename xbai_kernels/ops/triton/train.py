"""Fused training op: head forward with dropout on the step rows, SPR loss, and its backward.

Forward: one kernel gathers the step rows, runs W1 on tensor cores and, in its epilogue, adds b1,
applies ReLU, draws the dropout mask with Philox, stores keep * relu(...) in the 16-bit dot dtype and
reduces against W2. That stored tensor is the only [n, 2d] one kept for the backward (half the bytes
of an fp32 copy; no separate mask, since it is > 0 exactly where a unit is kept and active).
Backward: one kernel forms the pre-activation gradient (in place, over the saved tensor), dW2 and
db1 in one pass; the two large products (dW1, d hidden) run on cuBLAS. The SPR loss itself works on the [n] logits in PyTorch (``ops.reference.spr_loss``), so its
count all-reduce over the process group is the reference's own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._validate import check_tensor
from .. import reference
from . import _launch
from ._tile import dropout_keep
from .packed import launch_rows_head

# Seeds are drawn from [0, 2**62): any int64 the generator gives, kept positive for readability.
_SEED_BOUND = 2**62


@triton.jit
def _head_backward_kernel(
    act_ptr,
    grad_ptr,
    w2_ptr,
    keep_scale,
    dpre_ptr,
    dw2_part_ptr,
    db1_part_ptr,
    n,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One pass over the saved act [n, H] = keep * relu(pre) (0 where ReLU or dropout cut the unit).

    With s = keep_scale (1 / (1 - p), 1 without dropout) and g = dL/dlogit [n]:
      dpre[i, u]     = g[i] * W2[u] * s * (act[i, u] > 0)       stored in act's dtype
      dw2_part[t, u] = sum_{i in row tile t} g[i] * act[i, u] * s
      db1_part[t, u] = sum_{i in row tile t} dpre[i, u]           (fp32, before rounding)
    No random numbers here: act > 0 is exactly "kept and active". ``dpre_ptr`` may be ``act_ptr``
    (every element is read before it is overwritten). Grid (row tiles, unit tiles); the caller sums
    the [row tiles, H] partials in a fixed order.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    index = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    index_ok = index < n
    units = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    unit_ok = units < H
    both_ok = index_ok[:, None] & unit_ok[None, :]
    offsets = index.to(tl.int64)[:, None] * H + units[None, :]
    act = tl.load(act_ptr + offsets, mask=both_ok, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + index, mask=index_ok, other=0.0).to(tl.float32) * keep_scale
    w2 = tl.load(w2_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)
    dw2 = tl.sum(grad[:, None] * act, axis=0)
    dpre = tl.where(act > 0.0, grad[:, None] * w2[None, :], 0.0)
    tl.store(dpre_ptr + offsets, dpre.to(dpre_ptr.dtype.element_ty), mask=both_ok)
    tl.store(dw2_part_ptr + pid_m * H + units, dw2, mask=unit_ok)
    tl.store(db1_part_ptr + pid_m * H + units, tl.sum(dpre, axis=0), mask=unit_ok)


@triton.jit
def _keep_mask_kernel(seed_ptr, keep_ptr, n, H, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep[i, u] (uint8 [n, H]): the dropout mask the training kernels draw for this seed."""
    index = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    unit0 = tl.program_id(1) * BLOCK_N
    units = unit0 + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(seed_ptr), index, unit0, dropout_p, BLOCK_M, BLOCK_N)
    ok = (index < n)[:, None] & (units < H)[None, :]
    tl.store(keep_ptr + index.to(tl.int64)[:, None] * H + units[None, :], keep.to(tl.uint8), mask=ok)


def _backward_blocks(device: torch.device) -> tuple[int, int]:
    # Interpreter: small tiles so tiny tests cross tile edges; GPU: 64x128 fp32 tiles, 64 values a thread.
    return (16, 32) if device.type != "cuda" else (64, 128)


def dropout_keep_mask(seed: torch.Tensor, n: int, hidden_units: int, dropout_p: float) -> torch.Tensor:
    """bool [n, hidden_units]: which units the fused op keeps for step row i with this seed (int64 [1])."""
    keep = torch.empty(n, hidden_units, dtype=torch.uint8, device=seed.device)
    if n == 0:
        return keep.bool()
    block_m, block_n = _backward_blocks(seed.device)
    grid = (triton.cdiv(n, block_m), triton.cdiv(hidden_units, block_n))
    with _launch.device_guard(seed):
        _keep_mask_kernel[grid](seed, keep, n, hidden_units, float(dropout_p), BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool()


def draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """int64 [1] on ``device``: the Philox seed, from ``generator`` or torch's default generator.

    Drawn on the device when the generator lives there, so no host synchronization is needed; a
    fixed torch seed therefore reproduces the mask bit for bit.
    """
    if generator is None:
        return torch.randint(0, _SEED_BOUND, (1,), device=device)
    seed = torch.randint(0, _SEED_BOUND, (1,), device=generator.device, generator=generator)
    return seed.to(device)


class RowsHeadDropout(torch.autograd.Function):
    """logits[i] = W2 . dropout(relu(W1 hidden[rows[i]] + b1)) + b2, float32 [n].

    The gradient reaching ``hidden`` (scattered back to ``rows``) is multiplied by
    ``backbone_grad_scale`` (SPEC: the released code feeds the head h*s + h.detach()*(1-s)); the
    head's parameters get the full gradient.
    """

    @staticmethod
    def forward(ctx, hidden, rows, w1, b1, w2, b2, seed, dropout_p, backbone_grad_scale):
        fmt = _launch.dot_format(hidden, w1)
        n, d = rows.shape[0], hidden.shape[1]
        act = torch.empty(n, 2 * d, dtype=fmt.torch_dtype, device=hidden.device)
        logits = launch_rows_head(
            hidden, rows, w1, b1, w2.view(-1), b2, act=act, seed=seed, dropout_p=dropout_p,
        )
        ctx.save_for_backward(hidden, rows, w1, w2, act)
        ctx.consumed = False
        ctx.dropout_p = dropout_p
        ctx.backbone_grad_scale = backbone_grad_scale
        ctx.param_dtypes = (w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        if ctx.consumed:
            raise RuntimeError(
                "xbai_kernels triton sprm_head_loss: backward ran twice on one forward; its saved activation "
                "is overwritten by the first backward (retain_graph=True is not supported)"
            )
        ctx.consumed = True
        hidden, rows, w1, w2, act = ctx.saved_tensors
        n, units = act.shape
        w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.param_dtypes
        grad_logits = grad_logits.float().contiguous()
        block_m, block_n = _backward_blocks(act.device)
        num_m = triton.cdiv(n, block_m)
        dw2_part = torch.zeros(max(num_m, 1), units, dtype=torch.float32, device=act.device)
        db1_part = torch.zeros_like(dw2_part)
        dpre = act  # overwritten in place: the activation is not needed after this kernel
        if n > 0:
            with _launch.device_guard(act):
                _head_backward_kernel[(num_m, triton.cdiv(units, block_n))](
                    act, grad_logits, w2.view(-1), 1.0 / (1.0 - ctx.dropout_p), dpre, dw2_part, db1_part,
                    n, units, BLOCK_M=block_m, BLOCK_N=block_n,
                )
        grad_hidden = grad_w1 = None
        # cuBLAS in the dot dtype with fp32 accumulation, as eager autograd of the bf16 head does.
        if ctx.needs_input_grad[2]:
            grad_w1 = (dpre.t() @ hidden.index_select(0, rows).to(dpre.dtype)).to(w1_dtype)
        if ctx.needs_input_grad[0]:
            dx = (dpre @ w1.to(dpre.dtype)).mul_(ctx.backbone_grad_scale).to(hidden.dtype)
            grad_hidden = torch.zeros_like(hidden).index_add_(0, rows, dx)
        grad_b1 = db1_part.sum(0).to(b1_dtype)
        grad_w2 = dw2_part.sum(0).view(1, units).to(w2_dtype)
        grad_b2 = grad_logits.sum().view(1).to(b2_dtype)
        return grad_hidden, None, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


def sprm_head_loss(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    w1,
    b1,
    w2,
    b2,
    correct: torch.Tensor,
    valid: torch.Tensor,
    dropout_p: float,
    backbone_grad_scale: float,
    process_group=None,
    generator: torch.Generator | None = None,
):
    """Training head + SPR loss on the step rows (contract of ``ops.reference.sprm_head_loss``).

    hidden [N, d] fp32/fp16/bf16, rows int [n], correct/valid bool [n] -> (loss fp32 scalar,
    logits float32 [n], stats). Dropout masks are Philox draws seeded from ``generator`` (or torch's
    default generator): the same seed gives the same bits, but not the bits ``torch.rand`` would.
    """
    where = "sprm_head_loss"
    _launch.check_hidden(where, hidden)
    _launch.check_rows(where, rows, hidden.device)
    n = rows.shape[0]
    for name, flags in (("correct", correct), ("valid", valid)):
        check_tensor(where, name, flags, ndim=1, dtypes=(torch.bool,), device=hidden.device)
        if flags.shape[0] != n:
            raise ValueError(f"{where}: {name} has {flags.shape[0]} entries, rows has {n}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{where}: dropout_p must be in [0, 1), got {dropout_p}")
    w1c, b1c, w2c, b2c = _launch.head_weights(where, hidden, w1, b1, w2, b2)
    hidden = _launch.rows_last_contiguous(hidden)
    seed = draw_seed(hidden.device, generator) if dropout_p > 0.0 else rows.new_zeros(1, dtype=torch.int64)
    # Gather outside the Function: its input gradient is then [n, d] and autograd scatters it into
    # hidden's gradient as it does for the reference. Returning a dense [N, d] gradient from the
    # Function kept one more [N, d] tensor alive next to the backbone's own (measured on the H200:
    # +24 MiB at 8192 x 1536 bf16, making the fused step's peak higher than the released one).
    hidden_rows = hidden.index_select(0, rows.long())
    local_rows = torch.arange(n, device=hidden.device)
    logits = RowsHeadDropout.apply(
        hidden_rows, local_rows, w1c, b1c, w2c.view(1, -1), b2c, seed, float(dropout_p), float(backbone_grad_scale)
    )
    loss, stats = reference.spr_loss(logits, correct, valid, torch.ones_like(correct), process_group)
    return loss, logits, stats
