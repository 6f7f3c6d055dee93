"""The scheduler's logits by KV-cache slot: where a request's step logits wait until it finishes.

Every computed row leaves the worker as its KV-cache slot and its head logit, or NaN when the row
keeps none (``records``). The scheduler writes them into one float32 array indexed like the KV
cache itself (``block id * block_size + offset``), in one vectorised store per step. When a request
stops, its logits are read back through its block table, position by position, and only then are
the step candidates found in its token ids (``finished_logits``).

Keying by cache slot is what makes prefix caching free. A position read from the prefix cache is
never computed again, but its block is the one that request computed into, so its logit sits in
the slot the reader's block table points at. The logit of position i is the head at ``h_i``,
which the block's hash fixes; whether i is a step also needs token i + 1, which inside a block is
fixed too. Only a block's last position depends on a token the hash does not cover, which is why
the worker keeps the logit of every block's last position whatever follows (1 row in
``block_size``). A slot is overwritten only when its block is computed again, which a block still
in a request's table never is. A NaN where a step needs a logit means the invariant broke: the
request gets an error, not a number.

Works for one KV-cache group (every Qwen2/Qwen3 layout that vLLM builds for full attention); the
store refuses other layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import semantics
from ..rule import StepRule
from . import records


_ARRAYS = ("candidates", "logits", "think_starts", "think_ends")


@dataclass
class FinishedLogits:
    """What the front end needs to score a stopped request (int64 / float32 numpy arrays):
    ``candidates`` (positions i whose token i + 1 opens a step, SPEC rules 1 and 2), their
    ``logits``, and the positions of ``think_starts`` / ``think_ends`` markers, for the region
    rule, which the front end applies once it knows where a stop string cut the tokens.
    ``length``: the tokens covered (candidates and markers of positions past it are not known)."""

    candidates: np.ndarray
    logits: np.ndarray
    think_starts: np.ndarray
    think_ends: np.ndarray
    length: int

    @classmethod
    def join(cls, parts: list["FinishedLogits"]) -> "FinishedLogits":
        """Consecutive parts of one trajectory (``engine``'s stop-string chunks) as one."""
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in _ARRAYS), parts[-1].length)

    def to_payload(self) -> list:
        """Raw bytes (int32 positions, float32 logits) and the length: they cross vLLM's msgpack
        hop unchanged, where a numpy array inside an untyped field would arrive as its encoding."""
        dtypes = (np.int32, np.float32, np.int32, np.int32)
        return [getattr(self, name).astype(dtype).tobytes() for name, dtype in zip(_ARRAYS, dtypes)] + [self.length]

    @classmethod
    def from_payload(cls, payload) -> "FinishedLogits":
        candidates, logits, starts, ends, length = payload
        as_int = lambda data: np.frombuffer(data, dtype=np.int32).astype(np.int64)  # noqa: E731
        return cls(as_int(candidates), np.frombuffer(logits, dtype=np.float32), as_int(starts), as_int(ends), int(length))


class CacheSlotLogits:
    """float32 [num_blocks * block_size]: the latest logit recorded at each KV-cache slot (NaN: none)."""

    def __init__(self, num_blocks: int, block_size: int, rule: StepRule) -> None:
        self.block_size = block_size
        self.values = np.full(num_blocks * block_size, np.nan, dtype=np.float32)
        self.rule = rule

    def write(self, rows: np.ndarray) -> None:
        """File one step's rows (``records``' layout, int32 [2, n])."""
        slots, logits = records.decode(rows)
        self.values[slots] = logits

    def by_position(self, block_ids, stop: int, start: int = 0) -> np.ndarray:
        """float32 [stop - start]: the logits of positions start .. stop - 1 of a request whose block
        table (one KV group) is ``block_ids``; NaN past the blocks."""
        positions = np.arange(start, stop)
        blocks = np.asarray(block_ids, dtype=np.int64)
        inside = positions < blocks.size * self.block_size
        logits = np.full(positions.size, np.nan, dtype=np.float32)
        held = positions[inside]
        logits[inside] = self.values[blocks[held // self.block_size] * self.block_size + held % self.block_size]
        return logits

    def finished_logits(self, token_ids, block_ids, first_position: int = 0) -> FinishedLogits:
        """Step candidates and markers of a request's ``token_ids`` (prompt + output), with the
        candidates' logits read through its ``block_ids``; positions are absolute.

        With ``first_position`` > 0, ``token_ids`` are the tokens from that position on and the
        result is the next part of a trajectory whose earlier part ended there (``FinishedLogits.join``):
        candidates from ``first_position`` on, markers after it (the one at it went with that part).
        """
        # Candidates stop before the last token, which has no successor (and maybe no KV slot yet).
        logits = self.by_position(block_ids, first_position + max(len(token_ids) - 1, 0), start=first_position)
        finished = finished_logits(token_ids, self.rule, logits)
        if first_position:
            finished.candidates = finished.candidates + first_position
            finished.think_starts = finished.think_starts[finished.think_starts > 0] + first_position
            finished.think_ends = finished.think_ends[finished.think_ends > 0] + first_position
            finished.length += first_position
        return finished


_STEP_TABLES: dict[StepRule, np.ndarray] = {}


def finished_logits(token_ids, rule: StepRule, logits_by_position: np.ndarray) -> FinishedLogits:
    """SPEC rules 1 and 2 over one trajectory's ``token_ids`` (int [n]), the markers, and the
    candidates' logits from ``logits_by_position`` (float32 [>= n - 1])."""
    table = _STEP_TABLES.get(rule)
    if table is None:
        table = _STEP_TABLES[rule] = rule.step_table("cpu").numpy()
    ids = np.asarray(token_ids, dtype=np.int64)
    candidates = np.flatnonzero(semantics.opens_step(ids[:-1], ids[1:], table, rule.think_start_id))
    return FinishedLogits(
        candidates,
        np.asarray(logits_by_position, dtype=np.float32)[candidates],
        np.flatnonzero(ids == rule.think_start_id),
        np.flatnonzero(ids == rule.think_end_id),
        ids.size,
    )
