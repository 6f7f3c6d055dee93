"""Turning a stopped request's logits into SPEC's step and trajectory scores, in the front end.

The scheduler sends, with the output that stops a request, its step candidates, their logits and
its ``<think>`` / ``</think>`` positions (``logit_store.FinishedLogits``), all found in the
engine's final token ids. The front end knows one thing the engine does not: where a stop string
cut the completion. So it applies the thinking-region rule here, to the tokens kept, and scores
the steps: O(steps) numpy work on the server's event loop, nothing per token.

The rules are owned by ``xbai_kernels.semantics`` (step candidate, thinking region, trajectory
score), called on numpy arrays (as torch tensors, their ~45 small ops would cost about 0.6 ms of
dispatch per finished request on a server whose caches the rest of the traffic keeps cold); the
score is ``semantics.trajectory_score``'s formula in numpy (see ``score_steps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import semantics
from .logit_store import FinishedLogits

# The attributes a scored ``CompletionOutput`` may carry; ``sprm_prompt_*`` only when the request
# asked for the prompt's own score, ``*_error`` only when a score could not be computed,
# ``sprm_prune*`` only when it asked for pruning (``pruning``).
SPRM_FIELDS = (
    "sprm_score",
    "sprm_step_scores",
    "sprm_step_positions",
    "sprm_error",
    "sprm_prompt_score",
    "sprm_prompt_step_scores",
    "sprm_prompt_step_positions",
    "sprm_prompt_error",
    "sprm_pruned",
    "sprm_pruned_at_step",
    "sprm_prune_decisions",
)


def sprm_fields(completion_output) -> dict:
    """The SPRM attributes a finished ``CompletionOutput`` carries (empty for an unscored one)."""
    attributes = getattr(completion_output, "__dict__", None)
    if not attributes:
        return {}
    return {name: attributes[name] for name in SPRM_FIELDS if name in attributes}


@dataclass
class SPRMResult:
    """Scores of one trajectory: ``score`` (geometric mean of the step scores, 0.0 with no step),
    ``step_scores`` and ``step_positions`` (indices into prompt + completion token ids), and
    ``error`` (None, or why the scores are missing: a scored position was never computed)."""

    score: float | None
    step_scores: list[float]
    step_positions: list[int]
    error: str | None = None


def region_positions(finished: FinishedLogits, length: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC's scored positions among the first ``length`` tokens, and their logits: (int64 [n], float32 [n]).

    A candidate at i needs its step token i + 1 inside, a marker needs itself inside, so a
    trajectory that a stop string cut short is scored as the tokens it kept. The region rule runs
    over the candidates and the markers alone: O(steps), not O(tokens).
    """
    candidates = finished.candidates
    kept = np.searchsorted(candidates, length - 1)  # i + 1 < length
    candidates, logits = candidates[:kept], finished.logits[:kept]
    starts = finished.think_starts[: np.searchsorted(finished.think_starts, length)]
    ends = finished.think_ends[: np.searchsorted(finished.think_ends, length)]
    entries = np.concatenate((candidates, starts, ends))
    kind = np.repeat(np.arange(3), (candidates.size, starts.size, ends.size))
    inside = semantics.in_thinking_region(
        entries, np.zeros(entries.size, dtype=np.int64), kind == 1, kind == 2, np.array([length], dtype=np.int64)
    )[: candidates.size]
    return candidates[inside], logits[inside]


def score_steps(positions: np.ndarray, logits: np.ndarray) -> SPRMResult:
    """Score the steps at ``positions`` (int64 [n]) from their head ``logits`` (float32 [n]; NaN
    where the engine kept none, which makes the result an error instead of a number)."""
    if positions.size == 0:
        return SPRMResult(0.0, [], [])
    missing = np.isnan(logits)
    if missing.any():
        return SPRMResult(
            None,
            [],
            positions.tolist(),
            error=(
                f"no logit was recorded for {int(missing.sum())} scored position(s) (first: "
                f"{int(positions[missing][0])}); the engine did not keep them"
            ),
        )
    # SPEC's sigmoid and geometric mean (semantics.trajectory_score's formula, clamp included), in
    # numpy float64: the dozen small torch ops of trajectory_score cost ~0.3 ms here, on a loop
    # whose caches the rest of the server keeps cold. Step scores are reported in float32, as the
    # head computes them; they match the torch path to a float32 rounding, the score to ~1e-7.
    step_scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    score = float(np.exp(np.log(np.maximum(step_scores.astype(np.float64), semantics.SCORE_CLAMP_MIN)).mean()))
    return SPRMResult(score if math.isfinite(score) else None, step_scores.tolist(), positions.tolist())
