"""Turning the logits recorded during generation into SPEC's step and trajectory scores.

Records are keyed by absolute position, so everything the engine does to a request folds in
exactly: a preempted request recomputes positions (same key, the latest record wins), a stop string
trims tokens (the rule runs on the final token ids only), the n children of a request each have
their own records. The thinking-region rule needs the final trajectory, hence it runs at the end.

The rules themselves live in ``xbai_kernels.semantics`` (the one owner of the step-candidate rule,
the thinking-region rule and the trajectory score); this module only decides when to call them.
Finishing a request runs on the server's event loop, which serves every other client, so the work
is split: ``StepScan`` applies the step-candidate rule to the token ids while they arrive, a chunk
at a time (converting a 32k-token Python list to an array alone costs about 0.5 ms), and finishing
applies the region rule to the few candidates and markers found, reads their logits and scores
them: O(steps + one chunk), not O(tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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
        recorded = np.asarray(self._positions, dtype=np.int64)[::-1]
        values = np.asarray(self._logits, dtype=np.float32)[::-1]
        # Over the reversed records, np.unique's first index of each position is its latest record.
        keys, latest = np.unique(recorded, return_index=True)
        slots = np.minimum(np.searchsorted(keys, positions), keys.size - 1)
        found = keys[slots] == positions
        return np.where(found, values[latest[slots]], np.float32(0)), found


@dataclass
class SPRMResult:
    """Scores of one trajectory: ``score`` (geometric mean of the step scores, 0.0 with no step),
    ``step_scores`` and ``step_positions`` (indices into prompt + completion token ids), and
    ``error`` (None, or why the scores are missing: a scored position was never computed)."""

    score: float | None
    step_scores: list[float]
    step_positions: list[int]
    error: str | None = None


@dataclass(frozen=True)
class _RuleTables:
    step_table: torch.Tensor  # bool [V]: StepRule.step_table on the CPU
    think_start_id: int
    think_end_id: int


_TABLES: dict[StepRule, _RuleTables] = {}


def _tables(rule: StepRule) -> _RuleTables:
    tables = _TABLES.get(rule)
    if tables is None:
        tables = _TABLES[rule] = _RuleTables(rule.step_table("cpu"), rule.think_start_id, rule.think_end_id)
    return tables


class StepScan:
    """The step candidates and thinking markers of one growing trajectory (prompt, then completion).

    ``extend`` scans the next token ids with ``semantics.opens_step`` (the step-candidate rule, which
    needs only a token and its successor) and notes where ``<think>`` / ``</think>`` occur; the
    region rule needs the whole trajectory, so ``positions(length)`` applies it, with
    ``semantics.in_thinking_region``, to the first ``length`` tokens. Token ids are non-negative ints.
    """

    def __init__(self, rule: StepRule) -> None:
        self.rule = rule
        self._tables = _tables(rule)
        self.length = 0  # tokens scanned
        self._last_token = semantics.NO_TOKEN  # the token before the next chunk: opens no step
        self._candidates: list[np.ndarray] = []  # int64, increasing across the list
        self._markers: list[np.ndarray] = []  # int64 positions of <think> and </think>, increasing
        self._marker_kinds: list[np.ndarray] = []  # int64 semantics.EVENT_THINK_START / _END

    def extend(self, token_ids) -> None:
        """Scan the next ``len(token_ids)`` tokens (a list or an int array)."""
        if len(token_ids) == 0:
            return
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64))
        tables = self._tables
        # The chunk's first token is the successor of the previous chunk's last one.
        current = torch.cat((ids.new_tensor([self._last_token]), ids[:-1]))
        opens = semantics.opens_step(current, ids, tables.step_table, tables.think_start_id)
        candidates = opens.nonzero().squeeze(-1).numpy() + (self.length - 1)
        if candidates.size:
            self._candidates.append(candidates)
        kinds = semantics.marker_kind(ids, tables.think_start_id, tables.think_end_id)
        markers = kinds.nonzero().squeeze(-1)
        if markers.numel():
            self._markers.append(markers.numpy() + self.length)
            self._marker_kinds.append(kinds[markers].numpy())
        self._last_token = int(ids[-1])
        self.length += ids.numel()

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
        if candidates.size == 0:
            return candidates
        markers = _concat(self._markers)
        kept = np.searchsorted(markers, length)
        if kept == 0:
            # No marker: the region is 0 < i < length (the i + 1 < length side is already applied).
            return candidates[candidates > 0]
        kinds = torch.from_numpy(_concat(self._marker_kinds)[:kept])
        positions = torch.from_numpy(np.concatenate((candidates, markers[:kept])))
        is_start = torch.cat((torch.zeros(candidates.size, dtype=torch.bool), kinds == semantics.EVENT_THINK_START))
        is_end = torch.cat((torch.zeros(candidates.size, dtype=torch.bool), kinds == semantics.EVENT_THINK_END))
        inside = semantics.in_thinking_region(
            positions, torch.zeros_like(positions), is_start, is_end, torch.tensor([length], dtype=torch.int64)
        )
        return candidates[inside[: candidates.size].numpy()]


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
    step_scores = torch.sigmoid(torch.from_numpy(logits))
    score = float(semantics.trajectory_score(step_scores))
    return SPRMResult(score if math.isfinite(score) else None, step_scores.tolist(), positions.tolist())


def score_from_records(token_ids, records: StepLogits, rule: StepRule) -> SPRMResult:
    """Apply SPEC's inference rule to a whole trajectory's ``token_ids`` (prompt + completion) and read
    the recorded logits. O(tokens): the front end scans while tokens arrive instead (``StepScan``)."""
    scan = StepScan(rule)
    scan.extend(token_ids)
    return score_positions(scan.positions(), records)
