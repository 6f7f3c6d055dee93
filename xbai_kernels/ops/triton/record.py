"""DecodeScorer's per-step bookkeeping in two launches: which rows open a step, and the event append.

The reference does each in a dozen small PyTorch ops; after every sampled token that is ~30 launches,
which on a decode step of a few hundred microseconds is the whole overhead budget. Both kernels read
and write only [B]-sized data (plus one event slot per row) and never synchronize with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._validate import check_rows, check_tensor
from . import _launch
from ..reference import EVENT_STEP, EVENT_THINK_END, EVENT_THINK_START, NO_TOKEN

# Rows per program: decode batches are at most a few thousand rows, one or a few programs suffice.
_BLOCK = 128


@triton.jit
def _is_step_token(tokens, table_ptr, table_size):
    """int1 [BLOCK]: tokens[i] is in S, by one load of the step table (ids outside it are not)."""
    inside = (tokens >= 0) & (tokens < table_size)
    return inside & (tl.load(table_ptr + tokens, mask=inside, other=0) != 0)


@triton.jit
def _candidates_kernel(
    last_token_ptr, sampled_ptr, slots_ptr, table_ptr, table_size, out_ptr, B, think_start, no_token,
    BLOCK: tl.constexpr,
):
    """out[i] = sampled[i] in S and current not in S, not <think>, known (SPEC rules 1 and 2)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    slot = tl.load(slots_ptr + rows, mask=ok, other=0)
    current = tl.load(last_token_ptr + slot, mask=ok, other=no_token)
    sampled = tl.load(sampled_ptr + rows, mask=ok, other=no_token)
    opens = (
        _is_step_token(sampled, table_ptr, table_size)
        & ~_is_step_token(current, table_ptr, table_size)
        & (current != think_start)
        & (current != no_token)
    )
    tl.store(out_ptr + rows, opens.to(tl.int8), mask=ok)


@triton.jit
def _record_kernel(
    events_ptr, event_logits_ptr, counts_ptr, last_token_ptr, slots_ptr, positions_ptr, sampled_ptr,
    is_step_ptr, logits_ptr, B, capacity, think_start, think_end,
    STEP: tl.constexpr, THINK_START: tl.constexpr, THINK_END: tl.constexpr, BLOCK: tl.constexpr,
):
    """Append each row's event to its slot; slots are distinct, so rows never race."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    slot = tl.load(slots_ptr + rows, mask=ok, other=0)
    position = tl.load(positions_ptr + rows, mask=ok, other=0)
    sampled = tl.load(sampled_ptr + rows, mask=ok, other=-1)
    is_step = tl.load(is_step_ptr + rows, mask=ok, other=0) != 0
    logit = tl.load(logits_ptr + rows, mask=ok, other=0.0)
    marker = tl.where(sampled == think_start, THINK_START, tl.where(sampled == think_end, THINK_END, 0))
    kind = tl.where(is_step, STEP, marker).to(tl.int64)
    event_position = tl.where(is_step, position, position + 1)
    has_event = is_step | (marker != 0)
    count = tl.load(counts_ptr + slot, mask=ok, other=0)
    column = tl.where(has_event & (count < capacity), count, capacity)
    flat = slot * (capacity + 1) + column
    tl.store(events_ptr + flat, event_position * 4 + kind, mask=ok)
    tl.store(event_logits_ptr + flat, logit, mask=ok)
    tl.store(counts_ptr + slot, count + has_event.to(tl.int64), mask=ok)
    tl.store(last_token_ptr + slot, sampled, mask=ok)


def decode_candidates(
    last_token: torch.Tensor, sampled: torch.Tensor, slots: torch.Tensor, step_table: torch.Tensor, think_start_id: int
) -> torch.Tensor:
    """Triton ``ops.reference.decode_candidates``: bool [B], no host sync."""
    where = "decode_candidates"
    batch = sampled.shape[0]
    check_rows(where, sampled.device, batch, sampled=sampled, slots=slots)
    check_tensor(where, "last_token", last_token, ndim=1, dtypes=(torch.int64,), device=sampled.device)
    check_tensor(where, "step_table", step_table, ndim=1, dtypes=(torch.bool,), device=sampled.device)
    out = torch.empty(batch, dtype=torch.bool, device=sampled.device)
    if batch == 0:
        return out
    with _launch.device_guard(sampled):
        _candidates_kernel[(triton.cdiv(batch, _BLOCK),)](
            last_token, sampled, slots, step_table.contiguous().view(torch.int8), step_table.numel(),
            out.view(torch.int8), batch, think_start_id, NO_TOKEN, BLOCK=_BLOCK,
        )
    return out


def decode_record(
    events: torch.Tensor,
    event_logits: torch.Tensor,
    counts: torch.Tensor,
    last_token: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    sampled: torch.Tensor,
    is_step: torch.Tensor,
    logits: torch.Tensor,
    think_start_id: int,
    think_end_id: int,
) -> None:
    """Triton ``ops.reference.decode_record``: one launch, in place, no host sync."""
    where = "decode_record"
    batch = sampled.shape[0]
    device = sampled.device
    check_rows(where, device, batch, slots=slots, positions=positions, sampled=sampled)
    check_tensor(where, "is_step", is_step, ndim=1, dtypes=(torch.bool,), device=device)
    check_tensor(where, "logits", logits, ndim=1, dtypes=(torch.float32,), device=device)
    check_tensor(where, "events", events, ndim=2, dtypes=(torch.int64,), device=device)
    check_tensor(where, "event_logits", event_logits, ndim=2, dtypes=(torch.float32,), device=device)
    if batch == 0:
        return
    with _launch.device_guard(sampled):
        _record_kernel[(triton.cdiv(batch, _BLOCK),)](
            events, event_logits, counts, last_token, slots, positions, sampled, is_step.view(torch.int8),
            logits.contiguous(), batch, events.shape[1] - 1, think_start_id, think_end_id,
            STEP=EVENT_STEP, THINK_START=EVENT_THINK_START, THINK_END=EVENT_THINK_END, BLOCK=_BLOCK,
        )


@triton.jit
def _engine_rows_kernel(
    ids_ptr, positions_ptr, cache_slots_ptr, qsl_ptr, table_rows_ptr, token_ids_ptr, token_stride, token_columns,
    table_ptr, table_size, keep_ptr, out_slots_ptr, num_rows, num_requests, think_start, block_size, no_token,
    BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    """``ops.reference.engine_step_rows`` for one block of rows: a binary search finds each row's
    request, whose last row reads the following token from the token table (one load per request)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < num_rows
    live = in_range & (rows < tl.load(qsl_ptr + num_requests))
    # request = the last r with qsl[r] <= row (padding requests own no row).
    lo = tl.zeros_like(rows)
    hi = lo + num_requests
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(qsl_ptr + mid) <= rows
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    request = tl.minimum(lo, num_requests - 1)
    is_last = rows + 1 == tl.load(qsl_ptr + request + 1, mask=live, other=-1)
    current = tl.load(ids_ptr + rows, mask=live, other=no_token).to(tl.int64)
    position = tl.load(positions_ptr + rows, mask=live, other=0).to(tl.int64)
    following = tl.load(ids_ptr + rows + 1, mask=live & ~is_last & (rows + 1 < num_rows), other=no_token).to(tl.int64)
    table_row = tl.load(table_rows_ptr + request, mask=live & is_last, other=0).to(tl.int64)
    column = tl.minimum(position + 1, token_columns - 1)
    sampled = tl.load(token_ids_ptr + table_row * token_stride + column, mask=live & is_last, other=no_token).to(tl.int64)
    following = tl.where(is_last, sampled, following)
    opens = (
        _is_step_token(following, table_ptr, table_size)
        & ~_is_step_token(current, table_ptr, table_size)
        & (current != think_start)
        & (current != no_token)
    )
    kept = live & (opens | ((position + 1) % block_size == 0))
    slot = tl.load(cache_slots_ptr + rows, mask=live, other=0).to(tl.int64)
    tl.store(keep_ptr + rows, kept.to(tl.int8), mask=in_range)
    tl.store(out_slots_ptr + rows, slot.to(tl.int32), mask=in_range)


def engine_step_rows(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache_slots: torch.Tensor,
    query_start_loc: torch.Tensor,
    table_rows: torch.Tensor,
    token_ids: torch.Tensor,
    step_table: torch.Tensor,
    think_start_id: int,
    block_size: int,
    keep: torch.Tensor,
    out_slots: torch.Tensor,
) -> None:
    """Triton ``ops.reference.engine_step_rows``: one launch, in place, no host sync."""
    where = "engine_step_rows"
    num_rows = input_ids.shape[0]
    num_requests = table_rows.shape[0]
    device = input_ids.device
    check_rows(where, device, num_rows, input_ids=input_ids, positions=positions, cache_slots=cache_slots)
    check_rows(where, device, num_requests + 1, query_start_loc=query_start_loc)
    check_rows(where, device, num_requests, table_rows=table_rows)
    check_tensor(where, "token_ids", token_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=device)
    check_tensor(where, "keep", keep, ndim=1, dtypes=(torch.bool,), device=device)
    check_tensor(where, "out_slots", out_slots, ndim=1, dtypes=(torch.int32,), device=device)
    if token_ids.stride(1) != 1 or keep.shape[0] != num_rows or out_slots.shape[0] != num_rows:
        raise ValueError(f"{where}: token_ids needs contiguous rows and the outputs [{num_rows}] rows")
    if block_size < 1:
        raise ValueError(f"{where}: block_size must be positive, got {block_size}")
    if num_rows == 0:
        return
    if num_requests == 0:
        keep.zero_()
        out_slots.zero_()
        return
    with _launch.device_guard(input_ids):
        _engine_rows_kernel[(triton.cdiv(num_rows, _BLOCK),)](
            input_ids, positions, cache_slots, query_start_loc, table_rows, token_ids, token_ids.stride(0),
            token_ids.shape[1], step_table.contiguous().view(torch.int8), step_table.numel(), keep.view(torch.int8),
            out_slots, num_rows, num_requests, think_start_id, block_size, NO_TOKEN,
            BLOCK=_BLOCK, SEARCH_STEPS=max(1, num_requests.bit_length()),
        )
