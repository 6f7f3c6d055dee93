"""Scoring finished trajectories: the inference step mask and per-trajectory scores (docs/semantics.md)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._validate import (
    FLOAT_DTYPES,
    CuSeqlensError,
    INDEX_DTYPES,
    check_cu_seqlens,
    check_cu_seqlens_layout,
    check_tensor,
)
from .head import SPRMHead
from .ops import dispatch
from .rule import StepRule


def _packed_layout(where: str, input_ids, cu_seqlens) -> torch.Tensor:
    check_tensor(where, "input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES)
    if cu_seqlens is None:
        return torch.tensor([0, input_ids.numel()], dtype=torch.int32, device=input_ids.device)
    return check_cu_seqlens(where, cu_seqlens, input_ids.numel(), input_ids.device)


def step_mask(input_ids: torch.Tensor, rule: StepRule, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The inference rule: bool [T], True at the positions whose hidden state scores a step.

    input_ids int32/int64 [T]: one trajectory, or several packed back to back with ``cu_seqlens``
    (int32 [S+1], flash-attn varlen layout); every sequence gets its own thinking region.
    """
    if not isinstance(rule, StepRule):
        raise TypeError(f"step_mask: rule must be a StepRule, got {type(rule).__name__}")
    cu_seqlens = _packed_layout("step_mask", input_ids, cu_seqlens)
    return dispatch.call(
        "step_mask", input_ids.device,
        input_ids.contiguous(), _step_table(rule, input_ids.device), rule.think_start_id, rule.think_end_id, cu_seqlens,
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
    ``cu_steps[s]:cu_steps[s+1]``), scores float32 [S] (the geometric mean, 0.0 with no step).
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
    Synchronizes with the host once, to size the output (and check ``cu_seqlens`` with the same read).

    With ``capacity`` (an int bound on the number of scored steps) nothing synchronizes: the step
    rows are compacted on the device into ``capacity`` slots, ``cu_seqlens`` is not checked on the
    host, and the flat fields hold ``capacity`` entries of which the first ``cu_steps[-1]`` are
    steps (padding: position and sequence_index -1, logit and step score 0). A trajectory that lost
    steps because the batch had more than ``capacity`` gets the score NaN, never a wrong number.
    """
    where = "score_trajectories"
    if not isinstance(head, SPRMHead):
        raise TypeError(f"{where}: head must be an SPRMHead, got {type(head).__name__}")
    if not isinstance(rule, StepRule):
        raise TypeError(f"{where}: rule must be a StepRule, got {type(rule).__name__}")
    check_tensor(where, "hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, device=head[0].weight.device)
    if hidden.shape[1] != head.hidden_size:
        raise ValueError(f"{where}: hidden has size {hidden.shape[1]} but the head expects {head.hidden_size}")
    check_tensor(where, "input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES, device=hidden.device)
    if input_ids.numel() != hidden.shape[0]:
        raise ValueError(f"{where}: input_ids has {input_ids.numel()} tokens but hidden has {hidden.shape[0]} rows")
    device = hidden.device
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0):
        raise ValueError(f"{where}: capacity must be a positive int, got {capacity!r}")
    # Only the layout here: without a capacity, find_steps checks the values in its one host sync.
    cu_seqlens = _unchecked_layout(where, input_ids, cu_seqlens)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()

    weights = head.weights
    find_steps, head_logits_rows, trajectory_scores = dispatch.implementations(
        _PACKED_OPS, device, dispatch.head_inputs(hidden, weights)
    )
    try:
        steps = find_steps(
            input_ids.contiguous(), _step_table(rule, device), rule.think_start_id, rule.think_end_id,
            cu_seqlens.contiguous(), capacity,
        )
    except CuSeqlensError as exc:
        # The op checks the values in the host read it makes anyway; the user called this function.
        raise ValueError(f"{where}: {exc.reason}") from None
    # With a capacity, the padding slots past cu_steps[-1] cost no head work (counted on the device).
    live = None if capacity is None else steps.cu_steps[-1:]
    logits = head_logits_rows(hidden, steps.rows, *weights, num_rows=live)
    step_scores, scores = trajectory_scores(logits, steps.cu_steps, steps.complete)
    return TrajectoryScores(
        positions=steps.positions,
        sequence_index=steps.sequence_index,
        logits=logits,
        step_scores=step_scores,
        cu_steps=steps.cu_steps,
        scores=scores,
    )


_PACKED_OPS = ("find_steps", "head_logits_rows", "trajectory_scores")


@functools.lru_cache(maxsize=32)
def _step_table(rule: StepRule, device: torch.device) -> torch.Tensor:
    """The rule's membership table on ``device``, built by the first call (a host-to-device copy, so
    the first call for a rule should not be inside a CUDA-graph capture)."""
    return rule.step_table(device)


def _unchecked_layout(where: str, input_ids, cu_seqlens) -> torch.Tensor:
    """``cu_seqlens`` checked from its metadata only (reading its values would synchronize)."""
    if cu_seqlens is None:
        cu_seqlens = torch.zeros(2, dtype=torch.int64, device=input_ids.device)
        cu_seqlens[1] = input_ids.numel()  # a fill, not a host-to-device copy: capturable in a graph
        return cu_seqlens
    check_cu_seqlens_layout(where, cu_seqlens, input_ids.device)
    return cu_seqlens
