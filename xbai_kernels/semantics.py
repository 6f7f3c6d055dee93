"""The SPRM rules, each implemented once (docs/semantics.md states them in words).

Every path that scores or trains calls these functions instead of restating a rule: the oracle
backend (``ops/reference.py``), ``DecodeScorer``, the vLLM recorder and results, the pooling route
and the training front-ends. The fast backends (Triton, CUDA) implement the same rules inside their
kernels and are tested against the oracle, hence against this module.

* Step candidate (``opens_step``): position i opens a step when token i+1 is a step token, and token
  i is neither a step token (only the first of a run counts), ``<think>``, nor unknown.
* Thinking region (``in_thinking_region``): a candidate counts only strictly between the
  ``<think>`` and ``</think>`` of its trajectory; a marker that does not occur exactly once bounds
  nothing (the region then starts at 0 / ends at the trajectory's length).
* Trajectory score (``segment_geomean``): the geometric mean of the step scores, each clamped at
  ``SCORE_CLAMP_MIN`` before the log; 0.0 for a trajectory without a step.
* Training labels and loss (``reward_outcome``, ``spr_loss``): reward > 0.5 is correct, reward
  0.1 marks a sample to ignore, and the self-filtered, class-balanced BCE of the released actor.

All functions are plain PyTorch on any device, free of host synchronization, and leaf code: they
import nothing from the rest of the package. The two selection rules (``opens_step``,
``in_thinking_region``) also take numpy arrays, which the vLLM front end scans on the host.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# An unknown token (the position before a trajectory's first known token): it opens no step.
NO_TOKEN = -1
# The geometric mean clamps step scores here before the log, so a score of 0 cannot give -inf.
SCORE_CLAMP_MIN = 1e-10
# Rewards: exactly this value marks a sample the loss ignores; above the threshold the answer is correct.
IGNORE_REWARD = 0.1
CORRECT_THRESHOLD = 0.5
# The loss up-weights positives by this factor; the epsilon keeps the weights finite on an empty batch.
POSITIVE_WEIGHT = 1.5
LOSS_EPS = 1e-5

# ----- which positions are scored ----------------------------------------------------------------


def is_step_token(tokens: torch.Tensor, step_table: torch.Tensor) -> torch.Tensor:
    """bool, the shape of ``tokens`` (int): whether each id is in the step set, by ``step_table``
    (bool [V], ``StepRule.step_table``); ids outside the table, ``NO_TOKEN`` included, are not.

    Written with operations torch tensors and numpy arrays share, so host code (the vLLM
    scheduler's reads at a request's stop) applies the same rule to numpy arrays (``opens_step``
    likewise)."""
    size = step_table.shape[0]
    inside = (tokens >= 0) & (tokens < size)
    return inside & step_table[tokens * inside]  # ids outside read entry 0 and are masked off


def opens_step(
    current: torch.Tensor, following: torch.Tensor, step_table: torch.Tensor, think_start_id: int
) -> torch.Tensor:
    """The step-candidate rule, elementwise: bool, the broadcast shape of ``current`` and ``following``.

    current int: token i; following int: token i+1; step_table bool [V]. Position i opens a step when
    token i+1 is a step token and token i is neither a step token (a run of step tokens is one
    boundary), ``<think>`` (a step token right after it opens nothing), nor ``NO_TOKEN``.
    """
    return (
        is_step_token(following, step_table)
        & ~is_step_token(current, step_table)
        & (current != think_start_id)
        & (current != NO_TOKEN)
    )


def opens_step_tables(step_table: np.ndarray, think_start_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``opens_step`` as two lookups, for a host that applies it to a few ids at a time (numpy).

    The rule is a condition on token i+1 and a condition on token i, so over ids in [0, V):
    opens_step(current, following) == may_open[current] & is_step[following], where ``is_step``
    (bool [V + 1]) is ``step_table`` with a last False entry that ``NO_TOKEN`` (-1) indexes, and
    ``may_open`` (bool [V]) is whether an id may precede a step: the rule itself, asked of every id
    followed by a step token. Returns (may_open, is_step)."""
    size = step_table.shape[0]
    is_step = np.zeros(size + 1, dtype=bool)
    is_step[:size] = step_table
    ids = np.arange(size, dtype=np.int64)
    step_id = int(np.flatnonzero(step_table)[0])
    may_open = opens_step(ids, np.full(size, step_id), step_table, think_start_id)
    return may_open, is_step


def in_thinking_region(
    positions: torch.Tensor,
    sequence: torch.Tensor,
    is_think_start: torch.Tensor,
    is_think_end: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """The thinking-region rule: bool [n], whether each entry lies strictly inside its trajectory's region.

    The n entries are distinct (position, token) occurrences of S trajectories: every token of a packed
    batch, or the de-duplicated events a decoder recorded. positions int64 [n] (index within its own
    trajectory), sequence int64 [n] in [0, S), is_think_start / is_think_end bool [n] (the entry is a
    ``<think>`` / ``</think>`` occurrence), lengths int64 [S] (the trajectory lengths; a decoder that
    does not know it passes a bound larger than any position). The region of a trajectory is
    ``start < position < end``: start is the position of ``<think>`` if it occurs exactly once, else 0;
    end is the position of ``</think>`` if it occurs exactly once, else its length.
    """
    num_seqs = lengths.shape[0]
    start = _lone_marker_position(is_think_start, positions, sequence, num_seqs, lengths * 0)
    end = _lone_marker_position(is_think_end, positions, sequence, num_seqs, lengths)
    return (positions > start[sequence]) & (positions < end[sequence])


def _lone_marker_position(is_marker, positions, sequence, num_seqs, default):
    """int64 [S]: per trajectory, the position of the marker if it occurs exactly once, else ``default``."""
    counts = _sum_by(sequence, is_marker * 1, num_seqs)
    where = _sum_by(sequence, positions * is_marker, num_seqs)
    return _array_module(counts).where(counts == 1, where, default)


def _array_module(array):
    return torch if isinstance(array, torch.Tensor) else np


def _sum_by(segment, values, num_segments: int):
    """int64 [num_segments]: the sum of integer ``values`` [n] per ``segment`` [n] (torch: index_add_,
    no host sync; numpy: add.at). The one place the rules need more than operations both share, so
    the front end of the vLLM plugin applies them to numpy arrays on the host."""
    if isinstance(values, torch.Tensor):
        return torch.zeros(num_segments, dtype=torch.int64, device=values.device).index_add_(0, segment, values.long())
    out = np.zeros(num_segments, dtype=np.int64)
    np.add.at(out, segment, values)
    return out


def sequence_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [total]: which sequence of a packed batch (cu_seqlens int [S+1]) each token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(seq_ids, lengths, output_size=total)


def scored_mask(
    input_ids: torch.Tensor,
    step_table: torch.Tensor,
    think_start_id: int,
    think_end_id: int,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """Both rules over packed trajectories: bool [T], True at the positions whose ``h`` scores a step.

    input_ids int [T], step_table bool [V], cu_seqlens int [S+1] (trajectory s is
    ``input_ids[cu_seqlens[s]:cu_seqlens[s+1]]``; each has its own thinking region). The last token
    of a trajectory opens no step: its next token belongs to the next trajectory.
    """
    total = input_ids.numel()
    ids = input_ids.long()
    seq = sequence_index(cu_seqlens, total)
    local = torch.arange(total, device=ids.device) - cu_seqlens.long()[:-1][seq]
    following = torch.full_like(ids, NO_TOKEN)
    following[:-1] = torch.where(seq[1:] == seq[:-1], ids[1:], NO_TOKEN)
    candidate = opens_step(ids, following, step_table, think_start_id)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    region = in_thinking_region(local, seq, ids == think_start_id, ids == think_end_id, lengths)
    return candidate & region


def step_positions(input_ids: torch.Tensor, rule) -> torch.Tensor:
    """The scored positions of one whole trajectory: int64 [n], increasing.

    input_ids int [L] (prompt + completion), rule a ``StepRule``. For engines that apply the rule
    when a request finishes (one trajectory at a time, typically on the host).
    """
    ids = input_ids.reshape(-1)
    cu_seqlens = torch.tensor([0, ids.numel()], dtype=torch.int64, device=ids.device)
    mask = scored_mask(ids, rule.step_table(ids.device), rule.think_start_id, rule.think_end_id, cu_seqlens)
    return mask.nonzero().squeeze(-1)


# ----- the same rule while decoding: events ------------------------------------------------------
# A decoder cannot apply the region rule until the trajectory is finished (a marker must occur
# exactly once), so it records events and applies ``in_thinking_region`` to them at the end. One
# event is one int64, (position << 2) | kind, with the logit beside it in a float32 buffer.
EVENT_STEP, EVENT_THINK_START, EVENT_THINK_END = 0, 1, 2


def marker_kind(tokens: torch.Tensor, think_start_id: int, think_end_id: int) -> torch.Tensor:
    """int64, the shape of ``tokens``: EVENT_THINK_START / EVENT_THINK_END where the token is a marker, else 0."""
    kind = torch.where(tokens == think_start_id, EVENT_THINK_START, 0)
    return torch.where(tokens == think_end_id, EVENT_THINK_END, kind)


def append_events(events, event_logits, counts, slots, offsets, has_event, kinds, positions, logits) -> None:
    """Write events in place at column ``counts[slot] + offset`` of their slot; no host sync.

    events int64 / event_logits float32 [num_slots, capacity + 1], counts int64 [num_slots]; the
    other arguments are [n] (slots, offsets, kinds, positions int64; has_event bool; logits float).
    Rows without an event and events past capacity go to the last (trash) column, so the write needs
    no gather-and-select. Does not advance ``counts``.
    """
    capacity = events.shape[1] - 1
    index = counts[slots] + offsets
    column = torch.where(has_event & (index < capacity), index, capacity)
    flat = slots * (capacity + 1) + column
    events.view(-1).index_put_((flat,), positions * 4 + kinds.long())
    event_logits.view(-1).index_put_((flat,), logits.float())


def scored_events(
    events: torch.Tensor, event_logits: torch.Tensor, num_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the region rule to one trajectory's recorded events: (positions int64 [n], logits float32 [n]).

    events int64 [k] (encoded as above, in recording order), event_logits float32 [k]. An event
    recorded twice at one position (a recomputed position) counts once, with its latest logit.
    ``num_tokens`` (the final trajectory length) drops events past the end: a step at i needs its
    step token i+1 inside, a marker needs itself inside. Positions come out in increasing order.
    """
    positions, kinds = events >> 2, events & 3
    if num_tokens is not None:
        inside = positions + (kinds == EVENT_STEP).long() < num_tokens
        events, event_logits, positions = events[inside], event_logits[inside], positions[inside]
    # Sorted unique keys put the events in position order; the last recording of a key wins.
    keys, inverse = torch.unique(events, sorted=True, return_inverse=True)
    order = torch.arange(events.numel(), device=events.device)
    latest = torch.full((keys.numel(),), -1, dtype=torch.int64, device=events.device)
    latest = latest.scatter_reduce(0, inverse, order, reduce="amax")
    positions, kinds, logits = keys >> 2, keys & 3, event_logits[latest]
    # Without a final length, the region's default end lies past every position.
    bound = torch.iinfo(torch.int64).max if num_tokens is None else num_tokens
    inside = in_thinking_region(
        positions,
        torch.zeros_like(positions),
        kinds == EVENT_THINK_START,
        kinds == EVENT_THINK_END,
        torch.tensor([bound], dtype=torch.int64, device=events.device),
    )
    steps = inside & (kinds == EVENT_STEP)
    return positions[steps], logits[steps].float()


# ----- how step scores combine ---------------------------------------------------------------------


def segment_geomean(scores: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """The trajectory score per segment: exp(mean(log(clamp(p, 1e-10)))), 0.0 for an empty segment.

    scores float [n] (step scores in [0, 1]), segment int64 [n] in [0, num_segments) -> float32 [num_segments].
    """
    log_p = torch.log(scores.float().clamp_min(SCORE_CLAMP_MIN))
    sums = torch.zeros(num_segments, dtype=torch.float32, device=scores.device).index_add_(0, segment, log_p)
    counts = torch.zeros(num_segments, dtype=torch.float32, device=scores.device).index_add_(
        0, segment, torch.ones_like(log_p)
    )
    return torch.where(counts > 0, torch.exp(sums / counts.clamp_min(1)), 0.0)


def trajectory_score(step_scores: torch.Tensor) -> torch.Tensor:
    """The score of one trajectory: float32 scalar tensor from its step scores float [n] (0.0 when n = 0)."""
    return segment_geomean(step_scores, torch.zeros(step_scores.numel(), dtype=torch.int64, device=step_scores.device), 1)[0]


def nonzero_logit_geomean(logits: torch.Tensor) -> torch.Tensor:
    """The released actor's monitoring number: per row, the geometric mean of sigmoid(logit) over its
    non-zero logits (0.0 for a row with none). logits float [B, T] -> float32 [B]."""
    logits = logits.detach().float()
    nonzero = logits != 0
    log_p = torch.where(nonzero, F.logsigmoid(logits).clamp_min(math.log(SCORE_CLAMP_MIN)), 0.0)
    counts = nonzero.sum(-1)
    return torch.where(counts > 0, torch.exp(log_p.sum(-1) / counts.clamp_min(1)), 0.0)


# ----- training ------------------------------------------------------------------------------------


def reward_outcome(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, valid) bool, the shape of ``rewards``: reward > 0.5, and reward != 0.1 (compared in
    float32, as the released code does, so a reward written as 0.1 always means "ignore")."""
    rewards = rewards.float()
    return rewards > CORRECT_THRESHOLD, rewards != torch.tensor(IGNORE_REWARD, dtype=torch.float32)


def spr_loss(
    logits: torch.Tensor,
    correct: torch.Tensor,
    valid: torch.Tensor,
    step_mask: torch.Tensor,
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SPR loss over elementwise-broadcast inputs of any shape.

    logits float32, correct/valid/step_mask bool, all broadcastable to logits' shape. Positions
    outside ``step_mask`` behave as logit 0: never kept. The positive/negative counts are summed
    over ``process_group`` (all data-parallel ranks, as the released actor does); the normalizer is local.
    """
    logits = logits.float()
    correct = correct.expand_as(logits)
    target = correct.float()
    # The self-supervised filter: keep a position only where the head already agrees with the
    # outcome; logit == 0 satisfies neither side.
    keep = ((logits > 0) & correct) | ((logits < 0) & ~correct)
    m = (keep & valid & step_mask).float()
    counts = torch.stack([(m * target).sum(), (m * (1 - target)).sum()])
    if process_group is not None:
        counts = _all_reduce_sum(counts, process_group)
    pos, neg = counts[0], counts[1]
    w_pos = POSITIVE_WEIGHT * neg / (pos + neg + LOSS_EPS)
    w_neg = pos / (pos + neg + LOSS_EPS)
    w = m * torch.where(correct, w_pos, w_neg)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = (bce * w).sum() / (w.sum() + LOSS_EPS)
    return loss, {"num_positive": pos.detach(), "num_negative": neg.detach()}


def _all_reduce_sum(tensor: torch.Tensor, process_group) -> torch.Tensor:
    import torch.distributed as dist

    group = None if process_group is True else process_group
    # The counts carry no gradient (they come from a boolean mask), so a plain all_reduce is exact.
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
