"""Turning the logits recorded during generation into SPEC's step and trajectory scores.

Records are keyed by absolute position, so everything the engine does to a request folds in
exactly: a preempted request recomputes positions (same key, kept once), a stop string trims
tokens (the rule runs on the final token ids only), the n children of a request each have their
own records. The thinking-region rule needs the final trajectory, hence it runs here, at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..ops import reference
from ..rule import StepRule
from ..scoring import step_mask


@dataclass
class StepLogits:
    """Logits recorded for one request, position -> logit (float). A later record replaces an earlier one."""

    by_position: dict[int, float] = field(default_factory=dict)

    def add(self, positions, logits) -> None:
        self.by_position.update(zip((int(p) for p in positions), (float(x) for x in logits)))


@dataclass
class SPRMResult:
    """Scores of one trajectory: ``score`` (geometric mean of the step scores, 0.0 with no step),
    ``step_scores`` and ``step_positions`` (indices into prompt + completion token ids), and
    ``error`` (None, or why the scores are missing: a scored position was never computed)."""

    score: float | None
    step_scores: list[float]
    step_positions: list[int]
    error: str | None = None


def score_from_records(token_ids: list[int], records: StepLogits, rule: StepRule) -> SPRMResult:
    """Apply SPEC's inference rule to ``token_ids`` (prompt + completion) and read the recorded logits."""
    if not token_ids:
        return SPRMResult(0.0, [], [])
    ids = torch.tensor(token_ids, dtype=torch.int64)
    positions = step_mask(ids, rule).nonzero().squeeze(-1).tolist()
    missing = [p for p in positions if p not in records.by_position]
    if missing:
        return SPRMResult(
            None,
            [],
            positions,
            error=(
                f"no hidden state was recorded for {len(missing)} scored position(s) (first: {missing[0]}); "
                "were they skipped by a prefix-cache hit?"
            ),
        )
    logits = torch.tensor([records.by_position[p] for p in positions], dtype=torch.float32)
    step_scores = torch.sigmoid(logits)
    score = float(reference.segment_geomean(step_scores, torch.zeros(len(positions), dtype=torch.int64), 1)[0])
    return SPRMResult(score if math.isfinite(score) else None, step_scores.tolist(), positions)
