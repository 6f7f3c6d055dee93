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
) -> TrajectoryScores:
    """Score finished trajectories from their hidden states.

    hidden [T, d] (fp32/fp16/bf16, ``h`` = input of the last decoder layer), input_ids int [T], one
    trajectory or packed with ``cu_seqlens`` int32 [S+1]. The head runs only on the scored rows.
    Synchronizes with the host once, to size the output.
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
