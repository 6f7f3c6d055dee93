"""Packed scorer: the head on selected rows of a packed hidden-state buffer, gathered in the kernel.

``head_logits_rows(hidden[T, d], rows[n])`` never copies the n selected rows out: each program
loads them by index straight into its tensor-core tiles. The same kernel, with the activation store
and dropout switched on, is the forward of the fused training op (``train.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..._validate import check_row_count
from . import _launch
from ._tile import chain_start, dropout_keep, preactivation_tile, relu_bias, sum_partials_kernel


@triton.jit
def rows_head_kernel(
    hidden_ptr,
    stride_row,
    rows_ptr,
    n,
    live_ptr,
    w1,
    b1_ptr,
    w2_ptr,
    partial_ptr,
    act_ptr,
    seed_ptr,
    dropout_p,
    keep_scale,
    d,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    STORE_ACT: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_LIVE: tl.constexpr,
    W1_DESC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """partial[tile, i] = sum_{u in tile} W2[u] * drop(relu(W1[u] . hidden[rows[i]] + b1[u])).

    Grid: (row tiles of BLOCK_M) x (unit tiles of BLOCK_N over H = 2d), visited GROUP_M row tiles at a
    time so that the programs running together share each W1 tile through L2. partial fp32
    [num_unit_tiles, n]. With DROPOUT, drop() keeps a unit with probability 1 - p (Philox seeded by
    *seed_ptr, counters = (unit // 4, i)) and scales it by keep_scale = 1 / (1 - p). With STORE_ACT,
    act[i, u] = keep * relu(...) (dropped units 0, not yet scaled) is stored in act's dtype [n, H]:
    the one tensor the backward needs, since act > 0 exactly where the unit passed ReLU and dropout.
    With HAS_LIVE only rows[:*live_ptr] are computed: row tiles past it return at once (padding).
    """
    chain_start(USE_PDL)
    pid = tl.program_id(0)
    num_m = tl.cdiv(n, BLOCK_M)
    num_n = tl.cdiv(H, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    live = n
    if HAS_LIVE:
        live = tl.minimum(tl.load(live_ptr).to(tl.int32), n)
        if pid_m * BLOCK_M >= live:
            return
    index = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    index_ok = index < live
    rows = tl.load(rows_ptr + index, mask=index_ok, other=0)
    unit0 = pid_n * BLOCK_N
    units = unit0 + tl.arange(0, BLOCK_N)
    unit_ok = units < H
    acc = preactivation_tile(
        hidden_ptr, stride_row, rows, index_ok, w1, unit0, units, unit_ok, d,
        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_DTYPE, PRECISION, W1_DESC,
    )
    act = relu_bias(acc, b1_ptr, units, unit_ok)
    if DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), index, unit0, dropout_p, BLOCK_M, BLOCK_N)
        act = tl.where(keep, act, 0.0)
    if STORE_ACT:
        act_ptrs = act_ptr + index.to(tl.int64)[:, None] * H + units[None, :]
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=index_ok[:, None] & unit_ok[None, :])
    w2 = tl.load(w2_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)
    partial = tl.sum(act * w2[None, :], axis=1)
    if DROPOUT:
        partial = partial * keep_scale
    tl.store(partial_ptr + pid_n * n + index, partial, mask=index_ok)


@dataclass(frozen=True)
class RowsConfig:
    """Launch shape of ``rows_head_kernel``; ``w1_tma``: W1 tiles arrive through a TMA descriptor
    (Hopper and newer, 16-bit weights); the gathered hidden rows always take pointer loads."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    w1_tma: bool = False


def default_config(n: int, d: int, device: torch.device, operand_bytes: int = 2) -> RowsConfig:
    """Small tiles under the interpreter (several tiles on tiny shapes); Hopper tensor-core tiles on GPU.

    Measured on an H200, 2% of 65536 rows, graph replay:
    TMA-fed W1 with 128x256x64 tiles, 3 stages: 237.8 us at d = 5120 (277.5 with pointer loads),
    122.9 at d = 3584 (141.4); at d = 1536 (3072 units, fewer tiles) 128x128x64, 4 stages: 26.2 (32.1).
    Without a TMA unit (before Hopper) the same tiles take pointer loads.
    """
    if device.type != "cuda":
        return RowsConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=1)
    if operand_bytes > 2:
        # fp32 operands (an fp32 head) take twice the shared memory per stage: the 16-bit tiles below
        # would ask for 256 KB, over Hopper's 227 KB per block.
        return RowsConfig(block_m=64, block_n=128, block_k=32, group_m=8, num_warps=4, num_stages=3)
    if n <= 64:
        return RowsConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4, w1_tma=True)
    if d < 3072:
        return RowsConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4, w1_tma=True)
    return RowsConfig(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3, w1_tma=True)


def launch_rows_head(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2_flat: torch.Tensor,
    b2: torch.Tensor,
    *,
    act: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    config: RowsConfig | None = None,
    num_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits float32 [n] of ``rows``; checked, contiguous inputs (see ``head_logits_rows``).

    ``act`` ([n, 2d]) receives keep * relu(W1 h + b1) (unscaled); ``seed`` (int64 [1] on the device)
    and ``dropout_p`` > 0 switch dropout on.
    """
    n = rows.shape[0]
    d = hidden.shape[1]
    logits = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return logits
    fmt = _launch.dot_format(hidden, w1)
    cfg = config or default_config(n, d, hidden.device, fmt.dtype.primitive_bitwidth // 8)
    num_m = triton.cdiv(n, cfg.block_m)
    num_n = triton.cdiv(2 * d, cfg.block_n)
    partial = torch.empty(num_n, n, dtype=torch.float32, device=hidden.device)
    dropout = dropout_p > 0.0
    w1_desc = cfg.w1_tma and _launch.tma_capable(w1, fmt)
    w1_arg = TensorDescriptor.from_tensor(w1, [cfg.block_n, cfg.block_k]) if w1_desc else w1
    chain = _launch.chained(hidden.device)
    with _launch.device_guard(hidden):
        rows_head_kernel[(num_m * num_n,)](
            hidden, hidden.stride(0), rows, n, num_rows if num_rows is not None else rows, w1_arg, b1, w2_flat, partial,
            act if act is not None else partial, seed if dropout else rows,
            float(dropout_p), 1.0 / (1.0 - dropout_p), d, 2 * d,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            EVEN_K=d % cfg.block_k == 0, DOT_DTYPE=fmt.dtype, PRECISION=fmt.precision,
            STORE_ACT=act is not None, DROPOUT=dropout, HAS_LIVE=num_rows is not None,
            W1_DESC=w1_desc, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **chain,
        )
        block = min(128, _launch.next_pow2(n))
        sum_partials_kernel[(triton.cdiv(n, block),)](
            partial, num_n, b2, partial, logits, n, num_rows if num_rows is not None else partial,
            HAS_MASK=False, HAS_LIVE=num_rows is not None, TILE_BLOCK=_launch.sum_block(num_n), BLOCK=block,
            **chain,
        )
    return logits


def head_logits_rows(hidden: torch.Tensor, rows: torch.Tensor, w1, b1, w2, b2, num_rows=None,
                     config: RowsConfig | None = None):
    """Head logits of ``hidden[rows]``: hidden [T, d] fp32/fp16/bf16, rows int32/int64 [n] -> float32 [n].

    Rows are gathered inside the kernel (no [n, d] copy). Indices must lie in [0, T); they are not
    checked on the device (that would need a host sync). ``num_rows`` (int tensor of one element on
    the device): only ``rows[:num_rows]`` are computed, the rest get 0.0 and cost nothing. Bitwise
    deterministic run to run.
    """
    where = "head_logits_rows"
    _launch.check_hidden(where, hidden)
    _launch.check_rows(where, rows, hidden.device)
    if num_rows is not None:
        check_row_count(where, num_rows, hidden.device)
    _launch.refuse_autograd(where, hidden, (w1, b1, w2, b2))
    w1, b1, w2, b2 = _launch.head_weights(where, hidden, w1, b1, w2, b2)
    hidden = _launch.rows_last_contiguous(hidden)
    return launch_rows_head(hidden, rows.contiguous(), w1, b1, w2, b2, config=config,
                            num_rows=None if num_rows is None else num_rows.reshape(1))
