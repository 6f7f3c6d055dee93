"""Turning the logits recorded during generation into SPEC's step and trajectory scores.

Records are keyed by absolute position, so everything the engine does to a request folds in
exactly: a preempted request recomputes positions (same key, the latest record wins), a stop string
trims tokens (the rule runs on the final token ids only), the n children of a request each have
their own records. The thinking-region rule needs the final trajectory, hence it runs at the end.

The rules are owned by ``xbai_kernels.semantics`` (step candidate, thinking region, trajectory
score). Finishing a request runs on the server's event loop, which serves every other client, so the
work is split: ``StepScan`` applies the step-candidate rule to the token ids while they arrive, a
chunk at a time (converting a 32k-token Python list to an array alone costs about 0.5 ms), and
finishing applies the region rule to the few candidates and markers found, reads their logits and
scores them: O(steps + one chunk), not O(tokens). The two selection rules are ``semantics``'s own,
called on numpy arrays (as torch tensors, their ~45 small ops would cost about 0.6 ms of dispatch per
finished request on a server whose caches the rest of the traffic keeps cold); the score is
``semantics.trajectory_score``'s formula in numpy (see ``score_positions``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import semantics
from ..rule import StepRule

# How many new tokens a request may accumulate before the front end scans them: the most that
# finishing a request has left to scan (about 40 us for 512 tokens), against one scan per chunk
# while decoding.
SCAN_CHUNK_TOKENS = 512

# The attributes a scored ``CompletionOutput`` may carry; ``sprm_prompt_*`` only when the request
# asked for the prompt's own score, ``*_error`` only when a score could not be computed.
SPRM_FIELDS = (
    "sprm_score",
    "sprm_step_scores",
    "sprm_step_positions",
    "sprm_error",
    "sprm_prompt_score",
    "sprm_prompt_step_scores",
    "sprm_prompt_step_positions",
    "sprm_prompt_error",
)


def sprm_fields(completion_output) -> dict:
    """The SPRM attributes a finished ``CompletionOutput`` carries (empty for an unscored one)."""
    attributes = getattr(completion_output, "__dict__", None)
    if not attributes:
        return {}
    return {name: attributes[name] for name in SPRM_FIELDS if name in attributes}


class StepLogits:
    """Logits recorded for one request: (position, logit) pairs in arrival order; for a position
    recorded more than once (recomputed after preemption) the latest record counts."""

    def __init__(self) -> None:
        self._positions: list[int] = []
        self._logits: list[float] = []

    def __len__(self) -> int:
        return len(self._positions)

    def add(self, positions, logits) -> None:
        if len(positions) != len(logits):
            raise ValueError(f"StepLogits.add: {len(positions)} positions but {len(logits)} logits")
        self._positions.extend(positions)
        self._logits.extend(logits)

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits float32 [n], found bool [n]) at ``positions`` int64 [n]; a missing position reads 0."""
        if not self._positions:
            return np.zeros(positions.size, dtype=np.float32), np.zeros(positions.size, dtype=bool)
        keys = np.asarray(self._positions, dtype=np.int64)
        values = np.asarray(self._logits, dtype=np.float32)
        if keys.size > 1 and not (keys[1:] > keys[:-1]).all():
            # Out of order or recorded twice (preemption recomputes positions): over the reversed
            # records, np.unique's first index of each position is its latest record.
            keys, latest = np.unique(keys[::-1], return_index=True)
            values = values[::-1][latest]
        slots = np.minimum(np.searchsorted(keys, positions), keys.size - 1)
        found = keys[slots] == positions
        return np.where(found, values[slots], np.float32(0)), found


@dataclass
class SPRMResult:
    """Scores of one trajectory: ``score`` (geometric mean of the step scores, 0.0 with no step),
    ``step_scores`` and ``step_positions`` (indices into prompt + completion token ids), and
    ``error`` (None, or why the scores are missing: a scored position was never computed)."""

    score: float | None
    step_scores: list[float]
    step_positions: list[int]
    error: str | None = None


_STEP_TABLES: dict[StepRule, np.ndarray] = {}


def _step_table(rule: StepRule) -> np.ndarray:
    """``StepRule.step_table`` as a numpy bool array, built once per rule."""
    table = _STEP_TABLES.get(rule)
    if table is None:
        table = _STEP_TABLES[rule] = rule.step_table("cpu").numpy()
    return table


class StepScan:
    """The step candidates and thinking markers of one growing trajectory (prompt, then completion).

    ``extend`` scans the next token ids with the step-candidate rule (it needs only a token and its
    successor) and notes where ``<think>`` / ``</think>`` occur; the region rule needs the whole
    trajectory, so ``positions(length)`` applies it to the first ``length`` tokens. Token ids are
    non-negative ints.
    """

    def __init__(self, rule: StepRule) -> None:
        self.rule = rule
        self._table = _step_table(rule)
        self.length = 0  # tokens scanned
        self._last_token = semantics.NO_TOKEN  # the token before the next chunk: opens no step
        self._candidates: list[np.ndarray] = []  # int64, increasing across the list
        self._starts: list[np.ndarray] = []  # int64 positions of <think>, increasing
        self._ends: list[np.ndarray] = []  # int64 positions of </think>, increasing

    def extend(self, token_ids) -> None:
        """Scan the next ``len(token_ids)`` tokens (a list or an int array)."""
        if len(token_ids) == 0:
            return
        rule = self.rule
        following = np.asarray(token_ids, dtype=np.int64)
        current = np.concatenate(([self._last_token], following[:-1]))
        opens = semantics.opens_step(current, following, self._table, rule.think_start_id)
        candidates = np.flatnonzero(opens) + (self.length - 1)
        if candidates.size:
            self._candidates.append(candidates)
        for markers, marker_id in ((self._starts, rule.think_start_id), (self._ends, rule.think_end_id)):
            found = np.flatnonzero(following == marker_id)
            if found.size:
                markers.append(found + self.length)
        self._last_token = int(following[-1])
        self.length += following.size

    def positions(self, length: int | None = None) -> np.ndarray:
        """SPEC's scored positions of the first ``length`` scanned tokens (default: all): int64 [n], increasing.

        A candidate at i needs its step token i + 1 inside, a marker needs itself inside, so a
        trajectory that a stop string cut short is scored as the tokens it kept.
        """
        length = self.length if length is None else length
        if not 0 <= length <= self.length:
            raise ValueError(f"StepScan.positions: length {length} outside the {self.length} scanned tokens")
        candidates = _concat(self._candidates)
        candidates = candidates[: np.searchsorted(candidates, length - 1)]  # i + 1 < length
        starts = _concat(self._starts)
        starts = starts[: np.searchsorted(starts, length)]
        ends = _concat(self._ends)
        ends = ends[: np.searchsorted(ends, length)]
        # The region rule over the candidates and the markers alone: O(steps), not O(tokens).
        entries = np.concatenate((candidates, starts, ends))
        kind = np.repeat(np.arange(3), (candidates.size, starts.size, ends.size))
        inside = semantics.in_thinking_region(
            entries, np.zeros(entries.size, dtype=np.int64), kind == 1, kind == 2, np.array([length], dtype=np.int64)
        )
        return candidates[inside[: candidates.size]]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    if len(parts) > 1:
        # Later calls reuse the joined array (a request is scored once or twice, the prompt and all).
        parts[:] = [np.concatenate(parts)]
    return parts[0]


def score_positions(positions: np.ndarray, records: StepLogits) -> SPRMResult:
    """Read the recorded logits at the scored ``positions`` (int64 [n]) and score them (SPEC)."""
    if positions.size == 0:
        return SPRMResult(0.0, [], [])
    logits, found = records.lookup(positions)
    if not found.all():
        missing = positions[~found]
        return SPRMResult(
            None,
            [],
            positions.tolist(),
            error=(
                f"no hidden state was recorded for {missing.size} scored position(s) (first: {int(missing[0])}); "
                "were they skipped by a prefix-cache hit?"
            ),
        )
    # SPEC's sigmoid and geometric mean (semantics.trajectory_score's formula, clamp included), in
    # numpy float64: the dozen small torch ops of trajectory_score cost ~0.3 ms here, on a loop
    # whose caches the rest of the server keeps cold. Step scores are reported in float32, as the
    # head computes them; they match the torch path to a float32 rounding, the score to ~1e-7.
    step_scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    score = float(np.exp(np.log(np.maximum(step_scores.astype(np.float64), semantics.SCORE_CLAMP_MIN)).mean()))
    return SPRMResult(score if math.isfinite(score) else None, step_scores.tolist(), positions.tolist())


def score_from_records(token_ids, records: StepLogits, rule: StepRule) -> SPRMResult:
    """Apply SPEC's inference rule to a whole trajectory's ``token_ids`` (prompt + completion) and read
    the recorded logits. O(tokens): the front end scans while tokens arrive instead (``StepScan``)."""
    scan = StepScan(rule)
    scan.extend(token_ids)
    return score_positions(scan.positions(), records)
