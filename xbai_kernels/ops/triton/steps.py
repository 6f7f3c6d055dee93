"""The packed scorer's bookkeeping on the device: step positions, their compaction, trajectory scores.

``score_trajectories`` over T packed tokens used to run some forty small PyTorch ops around the head
(a membership test, marker counts, a cumsum, scatters, segment sums); on a host that launches slowly
those cost far more than the head. Here the same work takes four launches (chained by programmatic
dependent launch on Hopper, ``_launch.chained``), each a pass over blocks of tokens or of slots,
with integer atomics only (results do not depend on scheduling):

1. ``_markers_kernel``: per sequence, how often ``<think>`` and ``</think>`` occur and where.
2. ``_mask_kernel``: SPEC's rule per token (``step_mask``), and the number of steps in each block.
3. ``_compact_kernel``: the k-th step (in position order) goes to slot k: each block's first slot is
   the sum of the counts of the blocks before it. Extra programs write the padding slots and the
   per-sequence boundaries ``cu_steps`` (a prefix sum of the per-sequence counts of launch 2).
4. ``_scores_kernel`` (after the head): sigmoid per slot, SPEC's geometric mean per sequence, summed
   in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._validate import INDEX_DTYPES, check_cu_seqlens_values, check_tensor
from ..reference import SCORE_CLAMP_MIN, PackedSteps
from . import _launch
from ._tile import chain_start

# Tokens (or slots) per program: one block is a few vector loads, and T = 65536 makes 64 programs.
BLOCK = 1024
# Entries of a count array summed per step of a prefix sum.
CHUNK = 1024
# Per-sequence int32 statistics: marker counts and indices, and the number of steps.
STATS: tl.constexpr = tl.constexpr(5)
START_COUNT: tl.constexpr = tl.constexpr(0)
START_INDEX: tl.constexpr = tl.constexpr(1)
END_COUNT: tl.constexpr = tl.constexpr(2)
END_INDEX: tl.constexpr = tl.constexpr(3)
STEPS: tl.constexpr = tl.constexpr(4)


@triton.jit
def _sequence_of(cu_ptr, num_seqs, tokens, SEARCH_STEPS: tl.constexpr):
    """int32, shape of ``tokens``: the sequence s with cu[s] <= token < cu[s + 1] (binary search; with
    empty sequences, the last s whose start is <= token, which is the one holding it)."""
    lo = tl.zeros_like(tokens)
    hi = lo + num_seqs
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(cu_ptr + mid).to(tl.int32) <= tokens
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _is_step(table_ptr, table_size, ids):
    """bool: whether each id is a step token (ids outside the table are not)."""
    inside = (ids >= 0) & (ids < table_size)
    return tl.load(table_ptr + ids, mask=inside, other=0) != 0


@triton.jit
def _sum_before(counts_ptr, end, CHUNK: tl.constexpr):
    """int32: counts[0] + ... + counts[end - 1] (a fixed-order sum of int32 counts)."""
    lanes = tl.arange(0, CHUNK)
    total = 0
    for c0 in range(0, end, CHUNK):
        total += tl.sum(tl.load(counts_ptr + c0 + lanes, mask=(c0 + lanes) < end, other=0), 0)
    return total


@triton.jit
def _markers_kernel(ids_ptr, total, cu_ptr, num_seqs, think_start, think_end, stats_ptr,
                    BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr, USE_PDL: tl.constexpr):
    """stats int32 [S, STATS] (zeroed): (count, index) of ``<think>``, then of ``</think>``, per sequence.

    The index is the largest local index of the marker, which is its index when the count is 1 (the
    only case the rule uses).
    """
    chain_start(USE_PDL)
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tokens < total
    ids = tl.load(ids_ptr + tokens, mask=ok, other=-1)
    is_start = ok & (ids == think_start)
    is_end = ok & (ids == think_end)
    # Markers are rare: most blocks stop here.
    if tl.sum((is_start | is_end).to(tl.int32), 0) > 0:
        seq = _sequence_of(cu_ptr, num_seqs, tokens, SEARCH_STEPS)
        local = tokens - tl.load(cu_ptr + seq).to(tl.int32)
        base = stats_ptr + seq * STATS
        tl.atomic_add(base + START_COUNT, 1, mask=is_start, sem="relaxed")
        tl.atomic_max(base + START_INDEX, local, mask=is_start, sem="relaxed")
        tl.atomic_add(base + END_COUNT, 1, mask=is_end, sem="relaxed")
        tl.atomic_max(base + END_INDEX, local, mask=is_end, sem="relaxed")


@triton.jit
def _mask_kernel(ids_ptr, total, cu_ptr, num_seqs, table_ptr, table_size, think_start, stats_ptr,
                 mask_ptr, block_counts_ptr, BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr, USE_PDL: tl.constexpr):
    """mask uint8 [T]: SPEC's inference rule per token; block_counts int32 [num_blocks]: steps per
    block; stats[s, STEPS] += steps of sequence s.

    Token i of its sequence is scored when token i + 1 (same sequence) is a step token, token i is
    neither a step token nor ``<think>``, and it lies strictly inside the thinking region (bounded by
    a marker that occurs exactly once, else by the sequence's ends).
    """
    chain_start(USE_PDL)
    pid = tl.program_id(0)
    tokens = pid * BLOCK + tl.arange(0, BLOCK)
    ok = tokens < total
    seq = _sequence_of(cu_ptr, num_seqs, tokens, SEARCH_STEPS)
    start = tl.load(cu_ptr + seq).to(tl.int32)
    end = tl.load(cu_ptr + seq + 1).to(tl.int32)
    current = tl.load(ids_ptr + tokens, mask=ok, other=-1)
    # Bounded by T as well: an unchecked cu_seqlens may end past it.
    following = tl.load(ids_ptr + tokens + 1, mask=ok & (tokens + 1 < end) & (tokens + 1 < total), other=-1)
    candidate = ok & _is_step(table_ptr, table_size, following)
    candidate &= ~_is_step(table_ptr, table_size, current) & (current != think_start)
    base = stats_ptr + seq * STATS
    start_count = tl.load(base + START_COUNT, mask=candidate, other=0)
    end_count = tl.load(base + END_COUNT, mask=candidate, other=0)
    region_start = tl.where(start_count == 1, tl.load(base + START_INDEX, mask=candidate, other=0), 0)
    region_end = tl.where(end_count == 1, tl.load(base + END_INDEX, mask=candidate, other=0), end - start)
    local = tokens - start
    scored = candidate & (local > region_start) & (local < region_end)
    tl.store(mask_ptr + tokens, scored.to(tl.uint8), mask=ok)
    tl.store(block_counts_ptr + pid, tl.sum(scored.to(tl.int32), 0))
    # Steps are a few percent of tokens: one integer atomic each.
    tl.atomic_add(base + STEPS, 1, mask=scored, sem="relaxed")


@triton.jit
def _compact_kernel(mask_ptr, total, cu_ptr, num_seqs, block_counts_ptr, num_blocks, stats_ptr, capacity,
                    rows_ptr, seq_out_ptr, positions_ptr, cu_steps_ptr, complete_ptr,
                    BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """Three kinds of programs, by program id:

    * [0, num_blocks): the steps of token block b go to slots sum(block_counts[:b]) + their rank in
      the block; rows / sequence_index / positions int64 [capacity] get the token, its sequence and
      its index within the sequence (steps at slots >= capacity are dropped);
    * the next cdiv(capacity, BLOCK): padding slots past the number of steps get row 0, -1, -1;
    * the last one: cu_steps int64 [S + 1] = min(steps before sequence s, capacity) and complete
      uint8 [S] = whether sequence s kept all its steps, from the per-sequence step counts.
    """
    chain_start(USE_PDL)
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    slot_programs = tl.cdiv(capacity, BLOCK)
    if pid < num_blocks:
        tokens = pid * BLOCK + lanes
        ok = tokens < total
        scored = tl.load(mask_ptr + tokens, mask=ok, other=0).to(tl.int32)
        slots = _sum_before(block_counts_ptr, pid, CHUNK) + tl.cumsum(scored, 0) - scored
        keep = (scored != 0) & (slots < capacity)
        seq = _sequence_of(cu_ptr, num_seqs, tokens, SEARCH_STEPS)
        local = tokens - tl.load(cu_ptr + seq).to(tl.int32)
        tl.store(rows_ptr + slots, tokens.to(tl.int64), mask=keep)
        tl.store(seq_out_ptr + slots, seq.to(tl.int64), mask=keep)
        tl.store(positions_ptr + slots, local.to(tl.int64), mask=keep)
    elif pid < num_blocks + slot_programs:
        slots = (pid - num_blocks) * BLOCK + lanes
        padding = (slots >= _sum_before(block_counts_ptr, num_blocks, CHUNK)) & (slots < capacity)
        tl.store(rows_ptr + slots, tl.zeros([BLOCK], dtype=tl.int64), mask=padding)
        tl.store(seq_out_ptr + slots, tl.full([BLOCK], -1, dtype=tl.int64), mask=padding)
        tl.store(positions_ptr + slots, tl.full([BLOCK], -1, dtype=tl.int64), mask=padding)
    else:
        tl.store(cu_steps_ptr, 0)
        carried = 0
        for s0 in range(0, num_seqs, CHUNK):
            s = s0 + tl.arange(0, CHUNK)
            valid = s < num_seqs
            steps = tl.load(stats_ptr + s * STATS + STEPS, mask=valid, other=0)
            through = carried + tl.cumsum(steps, 0)
            tl.store(cu_steps_ptr + s + 1, tl.minimum(through, capacity).to(tl.int64), mask=valid)
            # A sequence without steps loses none, wherever it lies.
            tl.store(complete_ptr + s, ((through <= capacity) | (steps == 0)).to(tl.uint8), mask=valid)
            carried += tl.sum(steps, 0)


@triton.jit
def _scores_kernel(logits_ptr, num_slots, cu_steps_ptr, num_seqs, complete_ptr, step_scores_ptr, scores_ptr,
                   SCORE_CLAMP_MIN: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Programs [0, S): scores float32 [S], SPEC's geometric mean of sigmoid(logit) over the slots of
    sequence s (clamped at SCORE_CLAMP_MIN before the log; 0.0 with no step; NaN when incomplete),
    summed block by block in slot order. Programs past S: step_scores float32 [num_slots] =
    sigmoid(logit) on the live slots [0, cu_steps[S]), 0.0 on padding."""
    chain_start(USE_PDL)
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    if pid < num_seqs:
        lo = tl.load(cu_steps_ptr + pid).to(tl.int32)
        hi = tl.load(cu_steps_ptr + pid + 1).to(tl.int32)
        log_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for s0 in range(lo, hi, BLOCK):
            slots = s0 + lanes
            logit = tl.load(logits_ptr + slots, mask=slots < hi, other=0.0)
            p = tl.maximum(tl.sigmoid(logit), SCORE_CLAMP_MIN)
            log_sum += tl.where(slots < hi, tl.log(p), 0.0)
        count = hi - lo
        mean = tl.sum(log_sum, 0) / tl.maximum(count, 1).to(tl.float32)
        score = tl.where(count > 0, tl.exp(mean), 0.0)
        score = tl.where(tl.load(complete_ptr + pid) != 0, score, float("nan"))
        tl.store(scores_ptr + pid, score)
    else:
        slots = (pid - num_seqs) * BLOCK + lanes
        live = slots < tl.load(cu_steps_ptr + num_seqs)
        logit = tl.load(logits_ptr + slots, mask=live, other=0.0)
        tl.store(step_scores_ptr + slots, tl.where(live, tl.sigmoid(logit), 0.0), mask=slots < num_slots)


def _search_steps(num_seqs: int) -> int:
    return max(1, num_seqs.bit_length())


def _check_layout(where: str, input_ids, step_table, cu_seqlens) -> None:
    check_tensor(where, "input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(where, "step_table", step_table, ndim=1, dtypes=(torch.bool,), device=input_ids.device)
    check_tensor(where, "cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=input_ids.device)
    if input_ids.numel() >= 2**31 - BLOCK:
        raise ValueError(f"{where}: {input_ids.numel()} tokens is more than the kernels' int32 indices hold")


def _mask_and_counts(input_ids, step_table, think_start_id, think_end_id, cu_seqlens):
    """(mask uint8 [T], block_counts int32 [num_blocks], stats int32 [S, STATS]) from launches 1 and 2."""
    total = input_ids.numel()
    num_seqs = cu_seqlens.numel() - 1
    num_blocks = triton.cdiv(total, BLOCK)
    device = input_ids.device
    stats = torch.zeros(num_seqs, STATS.value, dtype=torch.int32, device=device)
    mask = torch.empty(total, dtype=torch.uint8, device=device)
    block_counts = torch.empty(num_blocks, dtype=torch.int32, device=device)
    search = _search_steps(num_seqs)
    chain = _launch.chained(device)
    if num_blocks:
        with _launch.device_guard(input_ids):
            _markers_kernel[(num_blocks,)](
                input_ids, total, cu_seqlens, num_seqs, think_start_id, think_end_id, stats,
                BLOCK=BLOCK, SEARCH_STEPS=search, **chain,
            )
            _mask_kernel[(num_blocks,)](
                input_ids, total, cu_seqlens, num_seqs, step_table.view(torch.uint8), step_table.numel(),
                think_start_id, stats, mask, block_counts, BLOCK=BLOCK, SEARCH_STEPS=search, **chain,
            )
    return mask, block_counts, stats


def step_mask(input_ids, step_table, think_start_id: int, think_end_id: int, cu_seqlens) -> torch.Tensor:
    """SPEC's inference rule: bool [T] (see ``reference.step_mask``), two launches, no host sync."""
    _check_layout("step_mask", input_ids, step_table, cu_seqlens)
    mask, _, _ = _mask_and_counts(input_ids.contiguous(), step_table.contiguous(), think_start_id, think_end_id,
                               cu_seqlens.contiguous())
    return mask.view(torch.bool)


def find_steps(input_ids, step_table, think_start_id: int, think_end_id: int, cu_seqlens,
               capacity: int | None = None) -> PackedSteps:
    """The scored positions of packed trajectories, compacted in position order (``reference.find_steps``).

    Three launches; without ``capacity`` one host sync (the number of steps sizes the result; the
    values of ``cu_seqlens`` are checked with the same read). With a capacity, ``cu_seqlens`` is
    trusted: bad values give wrong positions, never an access out of bounds.
    """
    where = "find_steps"
    _check_layout(where, input_ids, step_table, cu_seqlens)
    input_ids, cu_seqlens = input_ids.contiguous(), cu_seqlens.contiguous()
    mask, block_counts, stats = _mask_and_counts(
        input_ids, step_table.contiguous(), think_start_id, think_end_id, cu_seqlens
    )
    if capacity is None:
        # The one host sync: the number of steps, read together with cu_seqlens to check it.
        host = torch.cat([cu_seqlens.long(), block_counts.sum().view(1).long()]).tolist()
        check_cu_seqlens_values(where, host[:-1], input_ids.numel())
        capacity = host[-1]
    num_seqs = cu_seqlens.numel() - 1
    num_blocks = block_counts.numel()
    device = input_ids.device
    rows = torch.empty(capacity, dtype=torch.int64, device=device)
    seq = torch.empty(capacity, dtype=torch.int64, device=device)
    positions = torch.empty(capacity, dtype=torch.int64, device=device)
    cu_steps = torch.empty(num_seqs + 1, dtype=torch.int64, device=device)
    complete = torch.empty(num_seqs, dtype=torch.bool, device=device)
    grid = num_blocks + triton.cdiv(capacity, BLOCK) + 1
    with _launch.device_guard(input_ids):
        _compact_kernel[(grid,)](
            mask, input_ids.numel(), cu_seqlens, num_seqs, block_counts, num_blocks, stats, capacity,
            rows, seq, positions, cu_steps, complete.view(torch.uint8),
            BLOCK=BLOCK, SEARCH_STEPS=_search_steps(num_seqs), CHUNK=CHUNK, **_launch.chained(device),
        )
    return PackedSteps(rows, seq, positions, cu_steps, complete)


def trajectory_scores(logits: torch.Tensor, cu_steps: torch.Tensor, complete: torch.Tensor):
    """(step_scores float32 [m], scores float32 [S]) of ``find_steps``' slots (``reference.trajectory_scores``)."""
    where = "trajectory_scores"
    check_tensor(where, "logits", logits, ndim=1, dtypes=(torch.float32,))
    check_tensor(where, "cu_steps", cu_steps, ndim=1, dtypes=(torch.int64,), device=logits.device)
    check_tensor(where, "complete", complete, ndim=1, dtypes=(torch.bool,), device=logits.device)
    if cu_steps.numel() != complete.numel() + 1:
        raise ValueError(f"{where}: cu_steps has {cu_steps.numel()} entries, complete {complete.numel()}; "
                         "cu_steps needs one more")
    logits, cu_steps, complete = logits.contiguous(), cu_steps.contiguous(), complete.contiguous()
    num_seqs = complete.numel()
    step_scores = torch.empty_like(logits)
    scores = torch.empty(num_seqs, dtype=torch.float32, device=logits.device)
    grid = num_seqs + triton.cdiv(logits.numel(), BLOCK)
    if grid:
        with _launch.device_guard(logits):
            _scores_kernel[(grid,)](
                logits, logits.numel(), cu_steps, num_seqs, complete.view(torch.uint8), step_scores, scores,
                SCORE_CLAMP_MIN=SCORE_CLAMP_MIN, BLOCK=BLOCK, **_launch.chained(logits.device),
            )
    return step_scores, scores
