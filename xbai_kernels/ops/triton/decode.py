"""In-decode scorer: the head on the rows of a decode batch that sampled a step token.

``head_logits_masked`` never synchronizes with the host and always launches the same kernel with
the same grid for a given (B, d, dtype), so it can be captured in a CUDA graph. Which rows are
steps is decided on the device: every program compacts the step rows of ``row_mask`` itself (a
running count of the mask), so rows that are not steps cost no head work, and a batch with no step
row reads no byte of W1 — only the mask.

One launch, deterministic: each program writes fp32 partial logits of its unit tile and zeroes its
share of the rows that are not steps, then takes an integer ticket; the program that takes the
last ticket sums the tiles of every step row in a fixed order and writes those logits (integer
atomics only, so the float sums never depend on scheduling; the bits depend on the launch shape,
which is fixed per (B, d, dtype)). The ticket counter
is one int32 per device, reset by that last program: calls on one device must not overlap in time
(one stream, as decode engines run it). Batches of more than 256 rows use a second launch for the
sum instead (``DecodeConfig.fused_reduction``), which spreads it over many programs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..._validate import check_tensor
from . import _launch
from ._tile import chain_start, preactivation_tile, relu_bias, sum_partials_kernel, sum_tiles
from .gathered import masked_by_compaction
from .packed import RowsConfig

# From this batch size up, head_logits_masked runs the gathered schedule. The decode kernel has each
# program walk every step row itself, which starves the tensor cores once hundreds of rows are steps
# (an H100 at d = 5120: 1024 step rows of 1024 took 3.3x cuBLAS, where the packed kernel, which
# the gathered schedule runs, came within 8% of cuBLAS on 1311 rows); below it, decode batches with
# a few steps keep the kernel tuned for them.
GATHERED_FROM_BATCH = 1024


@triton.jit
def _rows_of_steps(inclusive, first, BLOCK: tl.constexpr):
    """int32 [BLOCK]: how many entries of ``inclusive`` (a running count of the step mask) are still
    <= first + j. Over the whole mask that is the batch row of the (first + j)-th step (0-based j):
    the rows before it are exactly those whose running count has not passed j."""
    wanted = first + tl.arange(0, BLOCK)
    return tl.sum((inclusive[None, :] <= wanted[:, None]).to(tl.int32), axis=1)


@triton.jit
def _nth_step_rows(row_mask_ptr, B, first, BLOCK_M: tl.constexpr, MASK_CHUNK: tl.constexpr):
    """int32 [BLOCK_M]: the batch row of the (first + j)-th set entry of ``row_mask`` (0-based j),
    chunk by chunk of the mask (``_rows_of_steps`` summed over chunks), without any host-side
    compaction."""
    lanes = tl.arange(0, MASK_CHUNK)
    row = tl.zeros([BLOCK_M], dtype=tl.int32)
    carried = 0
    for c0 in range(0, B, MASK_CHUNK):
        flags = tl.load(row_mask_ptr + c0 + lanes, mask=(c0 + lanes) < B, other=0).to(tl.int32)
        row += _rows_of_steps(tl.cumsum(flags, 0) + carried, first, BLOCK_M)
        carried += tl.sum(flags, 0)
    return row


@triton.jit
def _masked_partials_kernel(
    hidden_ptr,
    stride_row,
    row_mask_ptr,
    B,
    w1,
    b1_ptr,
    w2_ptr,
    partial_ptr,
    b2_ptr,
    out_ptr,
    ticket_ptr,
    d,
    H,
    num_tiles,
    tile_units,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COUNT_CHUNK: tl.constexpr,
    MASK_CHUNK: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    W1_DESC: tl.constexpr,
    FUSED_REDUCTION: tl.constexpr,
    TILE_BLOCK: tl.constexpr,
    OUT_BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """partial[tile, row] = sum_{u in tile} W2[u] relu(W1[u] . hidden[row] + b1[u]) for step rows only.

    Program t owns the ``tile_units`` (<= BLOCK_N) hidden units starting at t * tile_units, of
    H = 2d. The tile need not be a power of two: 80-unit tiles at d = 5120 make 128 programs of equal
    work for 132 SMs, where 64-unit tiles made 160 (28 SMs streaming twice as much as the others) and
    128-unit tiles left 52 SMs idle. No step row: no W1 byte is read. partial fp32 [num_tiles, B],
    by batch row (entries of rows that are not steps stay unwritten; nothing reads them), or with
    FUSED_REDUCTION by step rank (the k-th step row at column k). With FUSED_REDUCTION every program
    writes 0.0 to its share of the rows that are not steps, and the last program to finish writes
    out[row] = sum_t partial[t, rank(row)] + b2 for the step rows only, then resets *ticket_ptr to 0.
    """
    chain_start(USE_PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    # One load of the mask (up to 1024 rows) for the count: every program waits on it before W1.
    # A batch that fits one chunk of the row search keeps the running count of that same load, so
    # the step rows cost no second trip to memory before the first W1 byte is asked for.
    lanes = tl.arange(0, COUNT_CHUNK)
    if ONE_CHUNK:
        flags = tl.load(row_mask_ptr + lanes, mask=lanes < B, other=0).to(tl.int32)
        num_steps = tl.sum(flags, 0)
        inclusive = tl.cumsum(flags, 0)
    else:
        num_steps = 0
        for c0 in range(0, B, COUNT_CHUNK):
            flags = tl.load(row_mask_ptr + c0 + lanes, mask=(c0 + lanes) < B, other=0).to(tl.int32)
            num_steps += tl.sum(flags, 0)
    if FUSED_REDUCTION:
        outs = tl.arange(0, OUT_BLOCK)
        for r0 in range(pid * OUT_BLOCK, B, programs * OUT_BLOCK):
            off_mask = tl.load(row_mask_ptr + r0 + outs, mask=(r0 + outs) < B, other=1) == 0
            tl.store(out_ptr + r0 + outs, tl.zeros([OUT_BLOCK], dtype=tl.float32), mask=off_mask)
    unit0 = pid * tile_units
    units = unit0 + tl.arange(0, BLOCK_N)
    unit_ok = (units < unit0 + tile_units) & (units < H)
    w2 = tl.load(w2_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)
    for first in range(0, num_steps, BLOCK_M):
        if ONE_CHUNK:
            rows = _rows_of_steps(inclusive, first, BLOCK_M)
        else:
            rows = _nth_step_rows(row_mask_ptr, B, first, BLOCK_M, MASK_CHUNK)
        row_ok = (first + tl.arange(0, BLOCK_M)) < num_steps
        acc = preactivation_tile(
            hidden_ptr, stride_row, rows, row_ok, w1, unit0, units, unit_ok, d,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_DTYPE, PRECISION, W1_DESC,
        )
        act = relu_bias(acc, b1_ptr, units, unit_ok)
        partial = tl.sum(act * w2[None, :], axis=1)
        if FUSED_REDUCTION:
            # By step rank: the last program then reads each tile's partials as one contiguous run.
            tl.store(partial_ptr + pid * B + first + tl.arange(0, BLOCK_M), partial, mask=row_ok)
        else:
            tl.store(partial_ptr + pid * B + rows, partial, mask=row_ok)
    if FUSED_REDUCTION:
        # Loaded by every program before its ticket, so the last one's tail waits on one load less.
        b2 = tl.load(b2_ptr).to(tl.float32)
        # Every thread's partial stores come before this program's release of its ticket.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        tl.debug_barrier()
        if ticket == programs - 1:
            # Only the step rows are summed: the serial tail of this one program grows with the
            # steps, not with B (a batch of 1024 rows without a step sums nothing).
            for first in range(0, num_steps, OUT_BLOCK):
                if ONE_CHUNK:
                    rows = _rows_of_steps(inclusive, first, OUT_BLOCK)
                else:
                    rows = _nth_step_rows(row_mask_ptr, B, first, OUT_BLOCK, MASK_CHUNK)
                ranks = first + tl.arange(0, OUT_BLOCK)
                row_ok = ranks < num_steps
                total = sum_tiles(partial_ptr, num_tiles, B, ranks, row_ok, TILE_BLOCK, OUT_BLOCK)
                tl.store(out_ptr + rows, total + b2, mask=row_ok)
            tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel; fixed for a given (B, d, dtype), hence graph-capturable.

    ``tile_units``: hidden units per program (at most ``block_n``; None: ``block_n``); ``w1_tma``: W1
    arrives through a TMA tensor descriptor (Hopper and newer, 16-bit weights; boxes of ``block_n``
    rows); ``fused_reduction``: the last program sums the tiles instead of a second launch;
    ``sum_tiles`` x ``sum_rows``: the block of partials the sum loads at once (powers of two; None:
    at most 32 tiles, at most 128 rows).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fused_reduction: bool = True
    tile_units: int | None = None
    w1_tma: bool = False
    sum_tiles: int | None = None
    sum_rows: int | None = None


@functools.cache  # a pure function of its arguments, asked again after every decoded token
def default_config(batch: int, d: int, device: torch.device, operand_bytes: int = 2) -> DecodeConfig:
    """Block sizes: small under the interpreter (several tiles on tiny test shapes), GPU-tuned otherwise
    (by sweeps of block shapes on an H200; docs/kernels.md summarises them)."""
    if device.type != "cuda":
        return DecodeConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)
    # A quarter of a decode batch samples a step token in the workload; one pass over W1
    # covers that many step rows, more steps take another pass (re-reading the tile from L2/HBM).
    block_m = min(128, max(16, triton.next_power_of_2(batch) // 4))
    # fp32 operands (an fp32 head) halve the K depth so a stage still fits Hopper's 227 KB per block.
    block_k = 256 // operand_bytes
    tma = operand_bytes == 2 and torch.cuda.get_device_capability(device)[0] >= 9
    if block_m <= 16:
        # Up to 64 rows: one launch (the last program's sum over a few step rows is cheaper than a
        # second launch). TMA-fed 128-unit tiles (d = 5120: 33-34 us against 34.7-36.6 for 64-unit
        # pointer tiles); d = 1536 is latency-bound, so fewer, deeper K steps (256 columns) help.
        if d < 2048:
            return DecodeConfig(16, 32, 2 * block_k if tma else block_k, 4, 4, w1_tma=tma)
        return DecodeConfig(16, 128 if tma else 64, block_k, 4, 4, w1_tma=tma)
    # 65-256 rows: still one launch, the last program summing a whole [tiles, 32 steps] block of
    # partials per load, stored by step rank so each tile's run is contiguous (d = 5120, B = 256:
    # 42.7 us with a quarter steps as with two launches, 3.1 us without a step against 5.5; a
    # tail gathering partials by batch row cost 6-15 us). With 64 step rows each program re-reads
    # them from L2 for every K step, so tiles stay wide, but one tile per SM in equal parts
    # (d = 5120: 78 units in 128 lanes, 132 programs): 42.7 us against 47.7 for 80 of 128 units.
    if block_m <= 64:
        if d < 2048:
            return DecodeConfig(block_m, 32, block_k, 4, 4, sum_rows=32)
        units = triton.cdiv(2 * d, torch.cuda.get_device_properties(device).multi_processor_count)
        return DecodeConfig(block_m, triton.next_power_of_2(units), block_k, 8, 4, tile_units=units, sum_rows=32)
    # More rows: a second launch spreads the sum over many programs (one launch: 180 against 145 us
    # with 256 step rows at d = 5120).
    return DecodeConfig(block_m, 32 if d < 2048 else 128, block_k, 8, 4 if d < 2048 else 3, fused_reduction=False)


def _sum_tiles(num_tiles: int, out_block: int, fused: bool) -> int:
    """Tiles the sum loads at once. The fused tail is one program's serial work after every other
    program finished, so it loads all tiles at once where registers allow (up to 8192 partials):
    on an H200 at d = 5120 (80 tiles), 32.5 / 33.3 us at B = 1 / 16 against 32.7 / 33.9 in chunks of 32."""
    if not fused:
        return _launch.sum_block(num_tiles)
    return max(2, min(_launch.next_pow2(num_tiles, minimum=2), 8192 // out_block))


_TICKETS: dict[tuple[str, int | None], torch.Tensor] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """The device's int32 ticket counter (0 between calls; the last program of each call resets it)."""
    key = (device.type, device.index)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _TICKETS[key]


def head_logits_masked(
    hidden: torch.Tensor,
    row_mask: torch.Tensor,
    w1,
    b1,
    w2,
    b2,
    out: torch.Tensor | None = None,
    config: DecodeConfig | RowsConfig | None = None,
    schedule: str | None = None,
) -> torch.Tensor:
    """Head logits of the rows where ``row_mask`` is set, 0.0 elsewhere; no host synchronization.

    hidden [B, d] fp32/fp16/bf16 (rows may be strided), row_mask bool [B] -> float32 [B], written
    into ``out`` (float32 [B], contiguous) when given. Bitwise deterministic run to run.

    ``schedule``: ``"decode"`` (this module's kernel: built for a few step rows), ``"gathered"``
    (``gathered.masked_by_compaction``: a GEMM over the compacted step rows, for many), or None:
    chosen from B alone (``GATHERED_FROM_BATCH``), never from the step count, which only the
    device knows. ``config`` is the chosen schedule's launch shape (``DecodeConfig`` /
    ``RowsConfig``).
    """
    where = "head_logits_masked"
    _launch.check_hidden(where, hidden)
    check_tensor(where, "row_mask", row_mask, ndim=1, dtypes=(torch.bool,), device=hidden.device)
    batch, d = hidden.shape
    if row_mask.shape[0] != batch:
        raise ValueError(f"{where}: row_mask has {row_mask.shape[0]} entries, hidden has {batch} rows")
    _launch.refuse_autograd(where, hidden, (w1, b1, w2, b2))
    w1, b1, w2, b2 = _launch.head_weights(where, hidden, w1, b1, w2, b2)
    if out is None:
        out = torch.empty(batch, dtype=torch.float32, device=hidden.device)
    else:
        check_tensor(where, "out", out, ndim=1, dtypes=(torch.float32,), device=hidden.device)
        if out.shape[0] != batch or not out.is_contiguous():
            raise ValueError(f"{where}: out must be a contiguous float32 [{batch}], got shape {tuple(out.shape)}")
    if batch == 0:
        return out
    hidden = _launch.rows_last_contiguous(hidden)
    row_mask = row_mask.contiguous().view(torch.uint8)
    if schedule is None:
        schedule = "gathered" if batch >= GATHERED_FROM_BATCH else "decode"
    if schedule not in ("decode", "gathered"):
        raise ValueError(f'{where}: schedule must be "decode", "gathered" or None, got {schedule!r}')
    wanted = DecodeConfig if schedule == "decode" else RowsConfig
    if config is not None and not isinstance(config, wanted):
        raise ValueError(f"{where}: the {schedule} schedule takes a {wanted.__name__}, got {type(config).__name__}")
    if schedule == "gathered":
        return masked_by_compaction(hidden, row_mask, w1, b1, w2, b2, out, config=config)
    fmt = _launch.dot_format(hidden, w1)
    cfg = config or default_config(batch, d, hidden.device, fmt.dtype.primitive_bitwidth // 8)
    tile_units = cfg.tile_units or cfg.block_n
    if not 0 < tile_units <= cfg.block_n:
        raise ValueError(f"{where}: tile_units must be in [1, block_n = {cfg.block_n}], got {tile_units}")
    for name in ("sum_tiles", "sum_rows"):
        value = getattr(cfg, name)
        if value is not None and (value < 2 or value & (value - 1)):
            raise ValueError(f"{where}: {name} must be a power of two >= 2, got {value}")
    num_tiles = triton.cdiv(2 * d, tile_units)
    partial = torch.empty(num_tiles, batch, dtype=torch.float32, device=hidden.device)
    mask_chunk = min(128, _launch.next_pow2(batch))
    count_chunk = min(1024, _launch.next_pow2(batch))
    out_block = cfg.sum_rows or min(128, _launch.next_pow2(batch))
    tile_block = cfg.sum_tiles or _sum_tiles(num_tiles, out_block, cfg.fused_reduction)
    # A TMA box is a whole block_n tile: with fewer units per tile it also fetches rows of the next
    # tile (masked out after the matmul), which that tile's program is reading from HBM at about the
    # same time, so L2 may serve one of the two reads.
    w1_desc = cfg.w1_tma and _launch.tma_capable(w1, fmt)
    w1_arg = TensorDescriptor.from_tensor(w1, [cfg.block_n, cfg.block_k]) if w1_desc else w1
    chain = _launch.chained(hidden.device)
    with _launch.device_guard(hidden):
        ticket = _ticket(hidden.device) if cfg.fused_reduction else partial
        _masked_partials_kernel[(num_tiles,)](
            hidden, hidden.stride(0), row_mask, batch, w1_arg, b1, w2, partial, b2, out, ticket, d, 2 * d,
            num_tiles, tile_units, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            COUNT_CHUNK=count_chunk, MASK_CHUNK=mask_chunk, ONE_CHUNK=count_chunk == mask_chunk,
            EVEN_K=d % cfg.block_k == 0, DOT_DTYPE=fmt.dtype, PRECISION=fmt.precision, W1_DESC=w1_desc,
            FUSED_REDUCTION=cfg.fused_reduction, TILE_BLOCK=tile_block,
            OUT_BLOCK=out_block, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **chain,
        )
        if not cfg.fused_reduction:
            sum_partials_kernel[(triton.cdiv(batch, out_block),)](
                partial, num_tiles, b2, row_mask, out, batch, partial,
                HAS_MASK=True, HAS_LIVE=False, TILE_BLOCK=tile_block, BLOCK=out_block, **chain,
            )
    return out
