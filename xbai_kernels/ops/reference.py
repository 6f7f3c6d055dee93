"""Plain-PyTorch SPRM ops: the oracle every backend is tested against, and the path that runs anywhere.

Every public function here is an op of the backend contract: a Triton or CUDA backend exposes the
same names with the same signatures and results (up to floating-point tolerance), and ``dispatch``
picks one. The rules the ops apply (which positions are scored, the geometric mean, the loss) are
not restated here: the ops compose ``xbai_kernels.semantics``, their one implementation. All head
math accumulates in float32 whatever the input dtype, so relu(W1 h + b1) is never rounded to bf16.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import semantics
from .._validate import check_cu_seqlens_values

# The encoding and constants the fast backends share with this oracle (decode_record's events, the
# score clamp), and the loss the Triton training op reuses: defined once, in ``semantics``.
from ..semantics import (  # noqa: F401
    EVENT_STEP,
    EVENT_THINK_END,
    EVENT_THINK_START,
    NO_TOKEN,
    SCORE_CLAMP_MIN,
    is_step_token,
    opens_step,
    spr_loss,
)


def head_logits(hidden: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """logit = W2 relu(W1 h + b1) + b2 for every row. hidden [N, d] any float dtype -> float32 [N]."""
    with _float32(hidden):
        activation = torch.relu(F.linear(hidden.float(), w1.float(), b1.float()))
        return F.linear(activation, w2.float(), b2.float()).squeeze(-1)


def _float32(tensor: torch.Tensor):
    """The oracle computes in float32 even inside an autocast region, which would round to bf16.
    Outside one there is nothing to switch off (entering the context costs microseconds, and the
    CPU engine's recorder calls this at every step that scores a row)."""
    device_type = tensor.device.type
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def head_logits_rows(hidden: torch.Tensor, rows: torch.Tensor, w1, b1, w2, b2, num_rows=None) -> torch.Tensor:
    """Head over the selected rows only. hidden [T, d], rows int [n] -> float32 [n] (packed scorer).

    ``num_rows`` (int tensor of one element, on the device): only ``rows[:num_rows]`` are live, the
    rest are padding whose logit is 0.0 (a fast backend skips their work; this oracle masks).
    """
    logits = head_logits(hidden.index_select(0, rows.long()), w1, b1, w2, b2)
    return logits if num_rows is None else zero_past(logits, num_rows)


def zero_past(logits: torch.Tensor, num_rows: torch.Tensor) -> torch.Tensor:
    """``logits`` [n] with the entries from ``num_rows`` (a one-element device tensor) on set to 0.0."""
    return torch.where(torch.arange(logits.numel(), device=logits.device) < num_rows.reshape(()), logits, 0.0)


def head_logits_masked(
    hidden: torch.Tensor, row_mask: torch.Tensor, w1, b1, w2, b2, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Head over the rows where ``row_mask`` is set; 0.0 elsewhere (decode scorer).

    hidden [B, d], row_mask bool [B] -> float32 [B], written into ``out`` when given. A fast backend
    decides on the device which rows to compute; this oracle computes all rows and masks, which
    keeps it free of host synchronization.
    """
    logits = torch.where(row_mask, head_logits(hidden, w1, b1, w2, b2), 0.0)
    if out is None:
        return logits
    return out.copy_(logits)


def decode_candidates(
    last_token: torch.Tensor, sampled: torch.Tensor, slots: torch.Tensor, step_table: torch.Tensor, think_start_id: int
) -> torch.Tensor:
    """The step-candidate rule for one decode step: bool [B], True where the row's position opens a step.

    last_token int64 [num_slots] (the token at each slot's position being decoded, NO_TOKEN if
    unknown), sampled int64 [B] (the token after it), slots int64 [B], step_table bool [V]
    (``StepRule.step_table``).
    """
    return semantics.opens_step(last_token[slots], sampled, step_table, think_start_id)


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
    """Append one decode step's events in place (no host sync); slots must be distinct.

    A row records a step candidate at ``positions`` (with its logit) when ``is_step``, else a marker
    event at ``positions + 1`` when the sampled token is ``<think>``/``</think>``. Written in place:
    events int64 / event_logits float32 [num_slots, capacity + 1], counts and last_token int64
    [num_slots]. Events past capacity go to the trash column but are counted.
    """
    marker = semantics.marker_kind(sampled, think_start_id, think_end_id)
    # A step token is never a marker (StepRule forbids it), so a row records at most one event.
    kind = torch.where(is_step, EVENT_STEP, marker)
    event_position = torch.where(is_step, positions, positions + 1)
    has_event = is_step | (marker != 0)
    semantics.append_events(events, event_logits, counts, slots, torch.zeros_like(slots), has_event, kind, event_position, logits)
    counts.index_add_(0, slots, has_event.long())
    last_token.index_put_((slots,), sampled)


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
    """Which rows of one serving-engine step keep their head logit, in place, no host sync.

    input_ids int [T], positions int [T] and cache_slots int [T]: each scheduled row's token, its
    position in its request and its KV-cache slot. query_start_loc int32 [R + 1]: request r owns
    rows ``qsl[r]:qsl[r + 1]``; entries past the live requests repeat the live row count, so rows
    from ``qsl[-1]`` on are padding. table_rows int32 [R]: each request's row of token_ids int32
    [S, L], which holds every request's tokens by position, including the token sampled after its
    last scheduled row (or, for a partial prefill chunk, the next prompt token). The token after a
    row is the next row's token, except for a request's last row, where token_ids supplies it.

    A row keeps its logit when its position opens a step (SPEC's candidate rule) or is the last of
    its KV block (``(position + 1) % block_size == 0``: a prefix-cache hit that ends there needs it
    whatever token follows). Writes keep bool [T] (False for padding) and out_slots int32 [T]: each
    live row's cache slot, 0 for padding (vLLM's null block, which no request owns).
    """
    num_rows = input_ids.shape[0]
    device = input_ids.device
    rows = torch.arange(num_rows, device=device)
    bounds = query_start_loc.long()
    request = (torch.searchsorted(bounds, rows, right=True) - 1).clamp(0, table_rows.numel() - 1)
    live = rows < bounds[-1]
    is_last = rows + 1 == bounds[request + 1]
    current = input_ids.long()
    following = torch.full_like(current, NO_TOKEN)
    following[:-1] = current[1:]
    position = positions.long()
    column = (position + 1).clamp(0, token_ids.shape[1] - 1)
    from_table = token_ids[table_rows[request].long(), column].long()
    following = torch.where(is_last, from_table, following)
    opens = semantics.opens_step(current, following, step_table, think_start_id)
    kept = live & (opens | ((position + 1) % block_size == 0))
    slot = cache_slots.long()
    keep.copy_(kept)
    out_slots.copy_(torch.where(live, slot, 0))


# The inference rule on packed ids is the oracle's op as it stands: input_ids int [T], step_table bool
# [V] (``StepRule.step_table``), cu_seqlens int [S+1] -> bool [T].
step_mask = semantics.scored_mask


class PackedSteps(NamedTuple):
    """The scored positions of S packed trajectories, in position order (``find_steps``).

    rows int64 [m] (token index into the packed batch), sequence_index int64 [m], positions int64 [m]
    (index within its own trajectory), cu_steps int64 [S+1] (trajectory s owns slots
    ``cu_steps[s]:cu_steps[s+1]``), complete bool [S] (every step of s found a slot). With a capacity,
    m = capacity and the slots past ``cu_steps[-1]`` are padding: row 0, sequence_index and position -1.
    """

    rows: torch.Tensor
    sequence_index: torch.Tensor
    positions: torch.Tensor
    cu_steps: torch.Tensor
    complete: torch.Tensor


def find_steps(
    input_ids: torch.Tensor,
    step_table: torch.Tensor,
    think_start_id: int,
    think_end_id: int,
    cu_seqlens: torch.Tensor,
    capacity: int | None = None,
) -> PackedSteps:
    """The scored positions of packed trajectories (``step_mask``), compacted in position order.

    Without ``capacity`` the host synchronizes once to size the result (m = number of steps) and
    checks the values of ``cu_seqlens`` it reads in the same sync. With a capacity nothing
    synchronizes and ``cu_seqlens`` is trusted: m = capacity, steps past it are dropped and their
    trajectories are marked incomplete.
    """
    total = input_ids.numel()
    device = input_ids.device
    if capacity is None:
        # Before any op that trusts it (this oracle reads it apart from the count it syncs on).
        check_cu_seqlens_values("find_steps", cu_seqlens.tolist(), total)
    mask = step_mask(input_ids, step_table, think_start_id, think_end_id, cu_seqlens)
    token_seq = semantics.sequence_index(cu_seqlens, total)
    num_seqs = cu_seqlens.numel() - 1
    per_seq = torch.zeros(num_seqs, dtype=torch.int64, device=device).index_add_(0, token_seq, mask.long())
    cu_all = torch.zeros(num_seqs + 1, dtype=torch.int64, device=device)
    cu_all[1:] = torch.cumsum(per_seq, 0)
    if capacity is None:
        rows = mask.nonzero().squeeze(-1)
        seq = token_seq[rows]
        ones = torch.ones(num_seqs, dtype=torch.bool, device=device)
        return PackedSteps(rows, seq, rows - cu_seqlens.long()[seq], cu_all, ones)
    # The k-th step goes to slot k; steps past capacity and non-steps land in a spare slot, dropped.
    rank = torch.cumsum(mask, 0) - 1
    slot = torch.where(mask & (rank < capacity), rank, capacity)
    rows = torch.zeros(capacity + 1, dtype=torch.int64, device=device)
    rows = rows.scatter_(0, slot, torch.arange(total, device=device))[:capacity]
    kept = torch.arange(capacity, device=device) < cu_all[-1].clamp(max=capacity)
    rows = torch.where(kept, rows, 0)
    seq = torch.where(kept, token_seq[rows] if total else rows, -1)
    positions = torch.where(kept, rows - cu_seqlens.long()[seq.clamp(min=0)], -1)
    # A trajectory without steps loses none, wherever it lies.
    complete = (cu_all[1:] <= capacity) | (per_seq == 0)
    return PackedSteps(rows, seq, positions, cu_all.clamp(max=capacity), complete)


def trajectory_scores(logits: torch.Tensor, cu_steps: torch.Tensor, complete: torch.Tensor):
    """(step_scores float32 [m], scores float32 [S]) of ``find_steps``' slots, given their logits [m].

    step_scores = sigmoid(logit) on the live slots ``[0, cu_steps[-1])``, 0.0 on padding; scores are
    the geometric mean per trajectory (0.0 without a step, NaN where ``complete`` is False: the
    trajectory lost steps to the capacity, so its mean would be a wrong number).
    """
    slots = torch.arange(logits.numel(), device=logits.device)
    live = slots < cu_steps[-1]
    num_seqs = complete.numel()
    step_scores = torch.where(live, torch.sigmoid(logits.float()), 0.0)
    segment = torch.where(live, torch.searchsorted(cu_steps[1:], slots, right=True), num_seqs)
    scores = semantics.segment_geomean(step_scores, segment, num_seqs + 1)[:num_seqs]
    return step_scores, torch.where(complete, scores, float("nan"))


def dropout_keep_mask(shape, p: float, device, generator: torch.Generator | None) -> torch.Tensor | None:
    """Bernoulli(1 - p) keep mask as float scale (0 or 1/(1-p)); ``None`` when dropout is off."""
    if p <= 0.0:
        return None
    if p >= 1.0:
        return torch.zeros(shape, device=device)
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.float() / (1.0 - p)


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
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Training head + SPR loss on the step rows, through eager autograd.

    hidden [N, d] (``h`` of every position), rows int64 [n] (the step positions to train),
    correct/valid bool [n]. Returns
    (loss, logits float32 [n], stats). The backbone sees the gradient through ``h`` scaled by
    ``backbone_grad_scale`` exactly as the released code does it; the head gets the full gradient.
    """
    s = backbone_grad_scale
    hidden_rows = hidden.index_select(0, rows)
    h = hidden_rows * s + hidden_rows.detach() * (1 - s)
    with _float32(h):
        activation = torch.relu(F.linear(h.float(), w1.float(), b1.float()))
        keep = dropout_keep_mask(activation.shape, dropout_p, activation.device, generator)
        if keep is not None:
            activation = activation * keep
        logits = F.linear(activation, w2.float(), b2.float()).squeeze(-1)
    all_rows = torch.ones_like(correct)
    loss, stats = semantics.spr_loss(logits, correct, valid, all_rows, process_group)
    return loss, logits, stats
