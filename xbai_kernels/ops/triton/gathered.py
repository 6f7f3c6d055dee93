"""The masked head as a GEMM: compact the step rows on the device, then the packed kernel over them.

``decode.head_logits_masked`` is built for a decode batch in which a few rows are steps: every
program streams one tile of W1 and finds the step rows itself. With many step rows each program
works through all of them alone, and the tensor cores starve (on an H100 at d = 5120, 1024 rows
of 1024 took 3.3x cuBLAS). This schedule spreads the rows over the grid instead:

1. one program scans the mask once and writes each step row's rank, the rows in rank order, and
   their count (int32, on the device);
2. ``packed.rows_head_kernel`` runs over the compacted rows, a 2-D grid of row tiles x unit tiles
   sized for all B rows; the row tiles past the count return at once (no host sync, fixed grid,
   so a CUDA graph captures it);
3. its fixed-order sum gives each rank's logit, and a last pass writes ``out[row]``: the logit of
   the row's rank, 0.0 for rows that are not steps.

Deterministic like the other kernels: integer ranks and fixed-order float sums only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._tile import chain_start
from .packed import RowsConfig, launch_rows_head

# The scan's chunk: the mask is read CHUNK entries at a time by one program.
_SCAN_CHUNK = 1024


@triton.jit
def compact_rows_kernel(row_mask_ptr, B, rows_ptr, rank_ptr, count_ptr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """One program: rank[i] = (set entries of row_mask before i) for set entries, rows[rank[i]] = i,
    *count = the number of set entries. rank of unset entries and rows past the count are left
    unwritten (nothing reads them)."""
    chain_start(USE_PDL)
    lanes = tl.arange(0, CHUNK)
    carried = 0
    for c0 in range(0, B, CHUNK):
        index = c0 + lanes
        inside = index < B
        flags = tl.load(row_mask_ptr + index, mask=inside, other=0).to(tl.int32)
        rank = tl.cumsum(flags, 0) + carried - 1
        step = inside & (flags != 0)
        tl.store(rank_ptr + index, rank, mask=step)
        tl.store(rows_ptr + rank, index, mask=step)
        carried += tl.sum(flags, 0)
    tl.store(count_ptr, carried)


@triton.jit
def scatter_logits_kernel(logits_ptr, rank_ptr, row_mask_ptr, out_ptr, B, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """out[i] = logits[rank[i]] where row_mask[i] is set, else 0.0."""
    chain_start(USE_PDL)
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = index < B
    step = inside & (tl.load(row_mask_ptr + index, mask=inside, other=0) != 0)
    rank = tl.load(rank_ptr + index, mask=step, other=0)
    logit = tl.load(logits_ptr + rank, mask=step, other=0.0)
    tl.store(out_ptr + index, tl.where(step, logit, 0.0), mask=inside)


def masked_by_compaction(
    hidden: torch.Tensor,
    row_mask: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    out: torch.Tensor,
    config: RowsConfig | None = None,
) -> torch.Tensor:
    """``out`` float32 [B] = the head's logit of each row where ``row_mask`` (uint8 [B]) is set, 0.0
    elsewhere. Inputs already checked and normalised by ``decode.head_logits_masked`` (hidden
    [B, d] with contiguous rows, head weights in its dtype, w2 flat)."""
    batch = hidden.shape[0]
    device = hidden.device
    # rows, then count, then rank: one allocation.
    scratch = torch.empty(2 * batch + 1, dtype=torch.int32, device=device)
    rows, count, rank = scratch[:batch], scratch[batch : batch + 1], scratch[batch + 1 :]
    chain = _launch.chained(device)
    with _launch.device_guard(hidden):
        compact_rows_kernel[(1,)](row_mask, batch, rows, rank, count, CHUNK=min(_SCAN_CHUNK, _launch.next_pow2(batch)), **chain)
    logits = launch_rows_head(hidden, rows, w1, b1, w2, b2, config=config, num_rows=count)
    block = min(1024, _launch.next_pow2(batch))
    with _launch.device_guard(hidden):
        scatter_logits_kernel[(triton.cdiv(batch, block),)](logits, rank, row_mask, out, batch, BLOCK=block, **chain)
    return out
