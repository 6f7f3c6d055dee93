"""Scoring finished trajectories: the inference step mask and per-trajectory scores (SPEC.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_cu_seqlens, check_tensor
from .head import SPRMHead
from .ops import dispatch, reference
from .rule import StepRule


def _packed_layout(where: str, input_ids, cu_seqlens) -> torch.Tensor:
    check_tensor(where, "input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES)
    if cu_seqlens is None:
        return torch.tensor([0, input_ids.numel()], dtype=torch.int32, device=input_ids.device)
    return check_cu_seqlens(where, cu_seqlens, input_ids.numel(), input_ids.device)


def step_mask(input_ids: torch.Tensor, rule: StepRule, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC's inference rule: bool [T], True at the positions whose hidden state scores a step.

    input_ids int32/int64 [T]: one trajectory, or several packed back to back with ``cu_seqlens``
    (int32 [S+1], flash-attn varlen layout); every sequence gets its own thinking region.
    """
    if not isinstance(rule, StepRule):
        raise TypeError(f"step_mask: rule must be a StepRule, got {type(rule).__name__}")
    cu_seqlens = _packed_layout("step_mask", input_ids, cu_seqlens)
    return reference.step_mask(
        input_ids, rule.step_ids_tensor(input_ids.device), rule.think_start_id, rule.think_end_id, cu_seqlens
    )


@dataclass
class TrajectoryScore:
    """One trajectory: its scored positions (int64 [n]), step scores (float32 [n]) and score."""

    positions: torch.Tensor
    step_scores: torch.Tensor
    score: float


@dataclass
class TrajectoryScores:
    """Scores of S packed trajectories, flat over their n scored steps.

    positions int64 [n] (index within its own trajectory), sequence_index int64 [n],
    logits / step_scores float32 [n], cu_steps int64 [S+1] (steps of trajectory s are
    ``cu_steps[s]:cu_steps[s+1]``), scores float32 [S] (SPEC's geometric mean, 0.0 with no step).
    """

    positions: torch.Tensor
    sequence_index: torch.Tensor
    logits: torch.Tensor
    step_scores: torch.Tensor
    cu_steps: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return self.scores.numel()

    def __getitem__(self, s: int) -> TrajectoryScore:
        lo, hi = int(self.cu_steps[s]), int(self.cu_steps[s + 1])
        return TrajectoryScore(self.positions[lo:hi], self.step_scores[lo:hi], float(self.scores[s]))


@torch.no_grad()  # inference: the results carry no autograd graph back into the head
def score_trajectories(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    head: SPRMHead,
    rule: StepRule,
    cu_seqlens: torch.Tensor | None = None,
    capacity: int | None = None,
) -> TrajectoryScores:
    """Score finished trajectories from their hidden states.

    hidden [T, d] (fp32/fp16/bf16, ``h`` = input of the last decoder layer), input_ids int [T], one
    trajectory or packed with ``cu_seqlens`` int32 [S+1]. The head runs only on the scored rows.
    Synchronizes with the host once, to size the output.

    With ``capacity`` (an int bound on the number of scored steps) nothing synchronizes: the step
    rows are compacted on the device into ``capacity`` slots, ``cu_seqlens`` is not checked on the
    host, and the flat fields hold ``capacity`` entries of which the first ``cu_steps[-1]`` are
    steps (padding: position and sequence_index -1, logit and step score 0). A trajectory that lost
    steps because the batch had more than ``capacity`` gets the score NaN, never a wrong number.
    """
    if not isinstance(head, SPRMHead):
        raise TypeError(f"score_trajectories: head must be an SPRMHead, got {type(head).__name__}")
    check_tensor("score_trajectories", "hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, device=head[0].weight.device)
    if hidden.shape[1] != head.hidden_size:
        raise ValueError(
            f"score_trajectories: hidden has size {hidden.shape[1]} but the head expects {head.hidden_size}"
        )
    check_tensor("score_trajectories", "input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES, device=hidden.device)
    if input_ids.numel() != hidden.shape[0]:
        raise ValueError(
            f"score_trajectories: input_ids has {input_ids.numel()} tokens but hidden has {hidden.shape[0]} rows"
        )
    if capacity is not None:
        return _score_into_capacity(hidden, input_ids, head, rule, cu_seqlens, capacity)
    cu_seqlens = _packed_layout("score_trajectories", input_ids, cu_seqlens)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()

    mask = step_mask(input_ids, rule, cu_seqlens)
    rows = mask.nonzero().squeeze(-1)  # the one host sync: sizes the output
    logits = dispatch.call("head_logits_rows", hidden.device, hidden, rows, *head.weights)
    step_scores = torch.sigmoid(logits)
    num_seqs = cu_seqlens.numel() - 1
    seq = reference.sequence_index(cu_seqlens, input_ids.numel())[rows]
    steps_per_seq = torch.bincount(seq, minlength=num_seqs)
    cu_steps = torch.zeros(num_seqs + 1, dtype=torch.int64, device=hidden.device)
    cu_steps[1:] = torch.cumsum(steps_per_seq, 0)
    return TrajectoryScores(
        positions=rows - cu_seqlens.long()[seq],
        sequence_index=seq,
        logits=logits,
        step_scores=step_scores,
        cu_steps=cu_steps,
        scores=reference.segment_geomean(step_scores, seq, num_seqs),
    )


def _to_device_async(values, device: torch.device) -> torch.Tensor:
    """int64 tensor of host ``values`` on ``device`` without a blocking copy (pinned staging on CUDA)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _score_into_capacity(hidden, input_ids, head, rule, cu_seqlens, capacity) -> TrajectoryScores:
    """``score_trajectories`` with a fixed output size: no host synchronization anywhere."""
    where = "score_trajectories"
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
        raise ValueError(f"{where}: capacity must be a positive int, got {capacity!r}")
    device = hidden.device
    total = input_ids.numel()
    if cu_seqlens is None:
        cu_seqlens = torch.zeros(2, dtype=torch.int64, device=device)
        cu_seqlens[1] = total
    else:
        # Metadata only: reading the values on the host would synchronize.
        check_tensor(where, "cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"{where}: cu_seqlens must hold at least 2 entries [0, ..., total]")
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    num_seqs = cu_seqlens.numel() - 1
    step_ids = _to_device_async(list(rule.step_token_ids), device)
    mask = reference.step_mask(input_ids, step_ids, rule.think_start_id, rule.think_end_id, cu_seqlens)

    # Device-side compaction: the k-th step (in position order) goes to slot k; steps past capacity
    # and non-steps land in a spare slot that is dropped.
    rank = torch.cumsum(mask, 0) - 1
    slot = torch.where(mask & (rank < capacity), rank, capacity)
    rows = torch.zeros(capacity + 1, dtype=torch.int64, device=device)
    rows = rows.scatter_(0, slot, torch.arange(total, device=device))[:capacity]
    kept = torch.arange(capacity, device=device) < mask.sum().clamp(max=capacity)
    rows = torch.where(kept, rows, 0)

    logits = dispatch.call("head_logits_rows", device, hidden, rows, *head.weights)
    logits = torch.where(kept, logits, 0.0)
    step_scores = torch.where(kept, torch.sigmoid(logits), 0.0)
    token_seq = reference.sequence_index(cu_seqlens, total)
    # Padding counts in an extra segment, so the per-trajectory sums see real steps only.
    seq = torch.where(kept, token_seq[rows], num_seqs)
    steps_per_seq = torch.zeros(num_seqs + 1, dtype=torch.int64, device=device).index_add_(
        0, seq, torch.ones_like(seq)
    )[:num_seqs]
    all_steps_per_seq = torch.zeros(num_seqs, dtype=torch.int64, device=device).index_add_(
        0, token_seq, mask.long()
    )
    cu_steps = torch.zeros(num_seqs + 1, dtype=torch.int64, device=device)
    cu_steps[1:] = torch.cumsum(steps_per_seq, 0)
    scores = reference.segment_geomean(step_scores, seq, num_seqs + 1)[:num_seqs]
    scores = torch.where(steps_per_seq == all_steps_per_seq, scores, float("nan"))
    starts = cu_seqlens.long()[seq.clamp(max=num_seqs - 1)]
    return TrajectoryScores(
        positions=torch.where(kept, rows - starts, -1),
        sequence_index=torch.where(kept, seq, -1),
        logits=logits,
        step_scores=step_scores,
        cu_steps=cu_steps,
        scores=scores,
    )
