"""DecodeScorer: scores steps while a decoder generates, with per-slot state kept on the device.

Why events and not a running score: the thinking region depends on the whole trajectory
(``<think>``/``</think>`` must occur exactly once), which is unknown until the end. So each decode
step records, on the device and without synchronizing, what may matter:

* a *step candidate* at position i (token i+1 is a step token, token i is neither a step token nor
  ``<think>``) with the head's logit for ``h_i``;
* a *marker* event at the position of every ``<think>`` / ``</think>`` token.

``result`` applies the region rule to the events (``semantics.scored_events``), keyed by position and
de-duplicated, so a recomputed position (preemption, a re-run prefill chunk) counts once and trimmed
tokens (stop strings) drop out when the final length is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import semantics
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from .head import SPRMHead
from .ops import dispatch
from .rule import StepRule

_STEP_OPS = ("decode_candidates", "head_logits_masked", "decode_record")


@dataclass
class SlotResult:
    """What one finished trajectory scored: positions int64 [n], logits / step_scores float32 [n], score."""

    positions: torch.Tensor
    logits: torch.Tensor
    step_scores: torch.Tensor
    score: float


class DecodeScorer:
    """Per-slot device state for scoring steps during generation.

    ``num_slots`` concurrent trajectories, each recording at most ``capacity`` events (step
    candidates plus ``<think>``/``</think>`` occurrences). ``step`` and ``prefill`` never
    synchronize with the host; ``result`` does.
    """

    def __init__(self, head: SPRMHead, rule: StepRule, num_slots: int, capacity: int) -> None:
        if not isinstance(head, SPRMHead):
            raise TypeError(f"DecodeScorer: head must be an SPRMHead, got {type(head).__name__}")
        if not isinstance(rule, StepRule):
            raise TypeError(f"DecodeScorer: rule must be a StepRule, got {type(rule).__name__}")
        for name, value in (("num_slots", num_slots), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecodeScorer: {name} must be a positive int, got {value!r}")
        self.head = head
        self.rule = rule
        self.num_slots = num_slots
        self.capacity = capacity
        device = head[0].weight.device
        self.device = device
        self._step_table = rule.step_table(device)
        # One event = (position << 2 | kind) plus its logit. Column ``capacity`` is a trash column:
        # rows with nothing to record write there, so recording needs no gather-and-select.
        self._events = torch.zeros(num_slots, capacity + 1, dtype=torch.int64, device=device)
        self._logits = torch.zeros(num_slots, capacity + 1, dtype=torch.float32, device=device)
        self._counts = torch.zeros(num_slots, dtype=torch.int64, device=device)
        # The token at each slot's next position: the step scored at position i needs token i.
        self._last_token = torch.full((num_slots,), semantics.NO_TOKEN, dtype=torch.int64, device=device)

    # ----- recording (device only, no host sync) ------------------------------------------------

    def _logits_of(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return dispatch.call("head_logits_masked", hidden.device, hidden, rows, *self.head.weights)

    def _check_hidden(self, where: str, hidden: torch.Tensor, rows: int | None) -> None:
        check_tensor(where, "hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, device=self.device)
        if hidden.shape[1] != self.head.hidden_size:
            raise ValueError(f"{where}: hidden has size {hidden.shape[1]}, the head expects {self.head.hidden_size}")
        if rows is not None and hidden.shape[0] != rows:
            raise ValueError(f"{where}: hidden has {hidden.shape[0]} rows, expected {rows}")

    @torch.no_grad()  # scoring only: the buffers must not grow an autograd graph step after step
    def step(
        self, hidden: torch.Tensor, sampled_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Record one decoding step of B slots (each slot at most once per call).

        hidden [B, d]: ``h`` of the positions just decoded; sampled_ids int [B]: the tokens sampled
        from them (they sit at ``positions + 1``); slots int [B]; positions int [B].
        """
        batch = sampled_ids.shape[0] if isinstance(sampled_ids, torch.Tensor) and sampled_ids.dim() == 1 else None
        for name, value in (("sampled_ids", sampled_ids), ("slots", slots), ("positions", positions)):
            check_tensor("DecodeScorer.step", name, value, ndim=1, dtypes=INDEX_DTYPES, device=self.device)
            if value.shape[0] != batch:
                raise ValueError(f"DecodeScorer.step: {name} has {value.shape[0]} entries, sampled_ids has {batch}")
        self._check_hidden("DecodeScorer.step", hidden, batch)
        slots, positions, sampled = (t.long().contiguous() for t in (slots, positions, sampled_ids))

        # Three launches on a fast backend (candidates, head, record) instead of thirty small ops:
        # this runs after every sampled token.
        weights = self.head.weights
        candidates, head_logits, record = dispatch.implementations(
            _STEP_OPS, self.device, dispatch.head_inputs(hidden, weights)
        )
        is_step = candidates(self._last_token, sampled, slots, self._step_table, self.rule.think_start_id)
        logits = head_logits(hidden, is_step, *weights)
        record(
            self._events, self._logits, self._counts, self._last_token,
            slots, positions, sampled, is_step, logits, self.rule.think_start_id, self.rule.think_end_id,
        )

    @torch.no_grad()
    def prefill(self, slot: int, hidden: torch.Tensor, input_ids: torch.Tensor, start_position) -> None:
        """Record a chunk of n known positions of one slot (a prompt, or text to score).

        hidden [n, d]: ``h`` of positions ``start_position .. start_position + n - 1``;
        input_ids int [n + 1]: the tokens at those positions plus the one after the chunk.
        """
        if isinstance(slot, torch.Tensor) or not 0 <= int(slot) < self.num_slots:
            raise ValueError(f"DecodeScorer.prefill: slot must be an int in [0, {self.num_slots}), got {slot!r}")
        check_tensor("DecodeScorer.prefill", "input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES, device=self.device)
        n = input_ids.shape[0] - 1
        if n < 0:
            raise ValueError("DecodeScorer.prefill: input_ids must hold at least one token")
        self._check_hidden("DecodeScorer.prefill", hidden, n)
        ids = input_ids.long()
        token_positions = torch.arange(n + 1, device=self.device) + start_position

        is_step = semantics.opens_step(ids[:-1], ids[1:], self._step_table, self.rule.think_start_id)
        logits = self._logits_of(hidden, is_step)
        marker = semantics.marker_kind(ids, self.rule.think_start_id, self.rule.think_end_id)
        has_event = torch.cat([is_step, marker != 0])
        kinds = torch.cat([torch.full_like(marker[:-1], semantics.EVENT_STEP), marker])
        event_positions = torch.cat([token_positions[:-1], token_positions])
        event_logits = torch.cat([logits, torch.zeros(n + 1, dtype=torch.float32, device=self.device)])
        offsets = torch.cumsum(has_event.long(), 0) - has_event.long()
        slots = torch.full_like(offsets, int(slot))
        semantics.append_events(
            self._events, self._logits, self._counts, slots, offsets, has_event, kinds, event_positions, event_logits
        )
        self._counts[int(slot)] += has_event.sum()
        self._last_token[int(slot)] = ids[-1]

    def reset(self, slots) -> None:
        """Free ``slots`` (an int, a list of ints or an int tensor) for new trajectories."""
        slots = torch.as_tensor(slots, dtype=torch.int64, device=self.device).reshape(-1)
        self._counts[slots] = 0
        self._last_token[slots] = semantics.NO_TOKEN

    # ----- reading (synchronizes) ----------------------------------------------------------------

    def result(self, slot: int, num_tokens: int | None = None) -> SlotResult:
        """Apply the scoring rule (the thinking region, de-duplication) to what ``slot`` recorded.

        ``num_tokens``, the final trajectory length (prompt + completion), drops events past the end
        (tokens a stop string trimmed); without it every recorded event counts.
        """
        count = int(self._counts[slot])
        if count > self.capacity:
            raise RuntimeError(
                f"DecodeScorer: slot {slot} recorded {count} events but capacity is {self.capacity}; "
                f"construct the scorer with a larger capacity"
            )
        positions, logits = semantics.scored_events(
            self._events[slot, :count].cpu(), self._logits[slot, :count].cpu(), num_tokens
        )
        step_scores = torch.sigmoid(logits)
        return SlotResult(positions, logits, step_scores, float(semantics.trajectory_score(step_scores)))
