"""Best-of-N pruning: stop the candidates whose running step scores fall behind, while they decode.

The step scores of a candidate arrive in the scheduler as it generates (``engine``). Its *running
score* is the score it would get if it ended now: SPEC's rules (step candidates, thinking region,
clamped geometric mean) applied to its tokens so far. A policy compares running scores and stops
the losers, which frees their KV blocks and batch slots for the siblings that go on.

Policies (``sprm_prune`` in ``SamplingParams.extra_args`` / ``vllm_xargs``, parsed by ``parse_policy``):

* ``{"policy": "relative", "steps": [4, 8], "keep": [0.5, 0.25], "min_keep": 1}``: when a candidate
  completes its ``steps[j]``-th scored step, its running score is ranked among the scores its
  siblings had at that same step count (those that got there before it, in arrival order, and itself).
  ``keep[j]`` is the fraction of the N candidates meant to continue past ``steps[j]``, so among the
  arrivals at checkpoint j the best ``max(1, floor(keep[j] / keep[j-1] * arrivals))`` continue (``keep[-1]`` = 1)
  and a candidate ranked below stops. Ties rank the earlier arrival first.
* ``{"policy": "absolute", "threshold": 0.3, "min_steps": 4, "window": null, "min_keep": 1}``: a
  candidate stops at the first scored step (from ``min_steps`` on) where its running score, or the
  geometric mean of its last ``window`` step scores, is below ``threshold``.

Both never stop a candidate when that would leave fewer than ``min_keep`` of its group unpruned
(decoding, or finished on their own): a Best-of-N pick needs candidates to pick from. A request of
n = 1 is a group of one, so the absolute policy stops it only with ``min_keep`` 0.
Every decision is logged on the candidate (``Decision``), and ``replay`` recomputes the decisions of
a group from those logs: the engine's choices can be checked offline, exactly.

Imports nothing from vLLM: the policies, the running scores and the replay are plain Python.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import semantics
from .logit_store import FinishedLogits

POLICIES = ("relative", "absolute")


@dataclass(frozen=True)
class RelativePolicy:
    """Rank each candidate at its ``steps[j]``-th scored step among its siblings' scores there."""

    steps: tuple[int, ...] = (4, 8)
    keep: tuple[float, ...] = (0.5, 0.25)
    min_keep: int = 1

    def allowed(self, checkpoint: int, arrivals: int) -> int:
        """How many of ``arrivals`` candidates at checkpoint ``checkpoint`` (an index into ``steps``)
        continue: the share rounded down, but at least one. Rounding up would favour the early
        arrivals (the first always continues, the third of three with a half share too): over random
        arrival orders about 54% of 32 candidates pass a half share that way, 49% this way."""
        before = self.keep[checkpoint - 1] if checkpoint else 1.0
        # The ratio is a float: round away the representation error before floor (0.5 / 0.5 * 3 is 3).
        return max(1, math.floor(round(self.keep[checkpoint] / before * arrivals, 9)))

    def decide(self, checkpoint: int, earlier: list[float], score: float) -> tuple[int, bool]:
        """(allowed, stop) for an arrival at checkpoint ``checkpoint`` with ``score``, after the
        siblings' ``earlier`` scores there: it stops when ranked below the allowed count (ties rank
        the earlier arrival first). A missing logit (NaN) makes the score unknown: such a candidate
        is never stopped for it."""
        rank = 1 + sum(1 for other in earlier if other >= score)
        allowed = self.allowed(checkpoint, len(earlier) + 1)
        return allowed, rank > allowed and not math.isnan(score)


@dataclass(frozen=True)
class AbsolutePolicy:
    """Stop a candidate whose running (or windowed) score falls below ``threshold``."""

    threshold: float
    min_steps: int = 4
    window: int | None = None
    min_keep: int = 1

    def stops(self, step: int, score: float) -> bool:
        """Whether a candidate with ``step`` scored steps and this score stops."""
        return step >= self.min_steps and score < self.threshold


Policy = RelativePolicy | AbsolutePolicy


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer")
    return value


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1]")
    return float(value)


def parse_policy(value) -> Policy:
    """The policy a request's ``sprm_prune`` value describes (an object, or a JSON string holding one:
    the OpenAI server's ``vllm_xargs`` cannot hold an object); ``ValueError`` with the reason otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("takes a JSON object (as an object, or as a string holding one)") from None
    if not isinstance(value, dict):
        raise ValueError('takes an object such as {"policy": "relative", "steps": [4, 8], "keep": [0.5, 0.25]}')
    name = value.get("policy")
    if name not in POLICIES:
        raise ValueError(f'needs "policy": one of {", ".join(POLICIES)}')
    known = {"relative": {"policy", "steps", "keep", "min_keep"}, "absolute": {"policy", "threshold", "min_steps", "window", "min_keep"}}
    unknown = sorted(set(value) - known[name])
    if unknown:
        raise ValueError(f"has no key {unknown[0]!r} for the {name} policy (its keys: {', '.join(sorted(known[name]))})")
    min_keep = value.get("min_keep", 1)
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError("min_keep must be a non-negative integer")
    if name == "relative":
        steps, keep = value.get("steps", [4, 8]), value.get("keep", [0.5, 0.25])
        if not isinstance(steps, list) or not isinstance(keep, list) or not steps or len(steps) != len(keep):
            raise ValueError("needs steps and keep: lists of the same, non-zero length")
        steps = tuple(_positive_int(s, "each of steps") for s in steps)
        keep = tuple(_fraction(k, "each of keep") for k in keep)
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError("needs steps in increasing order")
        if any(b > a for a, b in zip(keep, keep[1:])):
            raise ValueError("needs keep fractions that do not grow from one checkpoint to the next")
        return RelativePolicy(steps, keep, min_keep)
    if "threshold" not in value:
        raise ValueError("needs a threshold for the absolute policy")
    threshold = value["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError("needs a threshold in (0, 1)")
    window = value.get("window")
    return AbsolutePolicy(
        float(threshold),
        _positive_int(value.get("min_steps", 4), "min_steps"),
        None if window is None else _positive_int(window, "window"),
        min_keep,
    )


def normalize_policy(value) -> dict:
    """The ``sprm_prune`` option as it travels to the engine: a plain dict with every default filled
    in (``parse_policy`` accepts it back)."""
    policy = parse_policy(value)
    name = "relative" if isinstance(policy, RelativePolicy) else "absolute"
    fields = {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(policy).items()}
    return {"policy": name, **fields}


def step_log_score(logit: float) -> float:
    """log of a step's clamped score, as ``results.score_steps`` computes it (the score in float32)."""
    score = np.float32(1.0 / (1.0 + math.exp(-float(logit)))) if logit > -700 else np.float32(0.0)
    return math.log(max(float(score), semantics.SCORE_CLAMP_MIN))


class RunningScore:
    """One trajectory's score as it would be if it ended after the tokens seen so far.

    ``add`` takes the next stretch of the trajectory (``FinishedLogits`` of positions from where the
    last one ended: its step candidates with their logits, its markers). A new candidate inside the
    region costs O(1); a marker re-derives the region and recounts (markers are rare).
    """

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.log_scores: list[float] = []
        self.think_starts: list[int] = []
        self.think_ends: list[int] = []
        self.count = 0  # steps inside the region so far
        self.log_sum = 0.0
        self._in_region: list[bool] = []

    def _bounds(self) -> tuple[int, float]:
        start = self.think_starts[0] if len(self.think_starts) == 1 else 0
        end = self.think_ends[0] if len(self.think_ends) == 1 else math.inf
        return start, end

    def add(self, part: FinishedLogits) -> None:
        markers = part.think_starts.size + part.think_ends.size
        self.think_starts += part.think_starts.tolist()
        self.think_ends += part.think_ends.tolist()
        start, end = self._bounds()
        for position, logit in zip(part.candidates.tolist(), part.logits.tolist()):
            self.positions.append(position)
            self.log_scores.append(step_log_score(logit) if logit == logit else math.nan)
            self._in_region.append(start < position < end)
            if self._in_region[-1]:
                self.count += 1
                self.log_sum += self.log_scores[-1]
        if markers:
            self._in_region = [start < p < end for p in self.positions]
            inside = [s for s, keep in zip(self.log_scores, self._in_region) if keep]
            self.count, self.log_sum = len(inside), math.fsum(inside)

    @property
    def score(self) -> float:
        """The running geometric mean (NaN where a step's logit is missing; 0.0 with no step)."""
        return math.exp(self.log_sum / self.count) if self.count else 0.0

    def window_score(self, window: int) -> float:
        inside = [s for s, keep in zip(self.log_scores, self._in_region) if keep][-window:]
        return math.exp(math.fsum(inside) / len(inside)) if inside else 0.0


@dataclass
class Decision:
    """One decision about a candidate. ``checkpoint``: index into a relative policy's steps (None for
    the absolute policy); ``step``: its scored steps then; ``score``: the score the policy compared;
    ``arrival``: its place among the group's arrivals at that checkpoint (0 first); ``allowed``: how
    many arrivals continue; ``kept``: candidates of the group not pruned before the decision;
    ``stop``: what the policy asked, ``stopped``: what happened (``min_keep`` may overrule)."""

    step: int
    score: float
    stop: bool
    stopped: bool
    kept: int
    checkpoint: int | None = None
    arrival: int | None = None
    allowed: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Sibling:
    """One candidate of a group as its policy sees it."""

    index: int
    running: RunningScore = field(default_factory=RunningScore)
    decisions: list[Decision] = field(default_factory=list)
    checkpoints_passed: int = 0
    live: bool = True
    pruned_at_step: int | None = None


class SiblingGroup:
    """The N candidates of one request and the policy that prunes them."""

    def __init__(self, policy: Policy, size: int, key: str = "") -> None:
        self.policy = policy
        self.size = size
        self.key = key
        self.members = 0  # requests of the group the scheduler tracks
        self.candidates: dict[int, Sibling] = {}
        self.kept = size  # candidates not pruned
        # Per checkpoint: the running scores of the candidates that reached it, in arrival order.
        self.arrivals: list[list[float]] = [[] for _ in getattr(policy, "steps", ())]

    def candidate(self, index: int) -> Sibling:
        found = self.candidates.get(index)
        if found is None:
            found = self.candidates[index] = Sibling(index)
        return found

    def finished(self, index: int) -> None:
        """A candidate stopped (on its own, or pruned): later stretches of it are not read."""
        self.candidate(index).live = False

    def settled(self, index: int) -> bool:
        """Whether the policy can no longer stop candidate ``index``: it stopped, or it passed a
        relative policy's last checkpoint."""
        candidate = self.candidate(index)
        steps = getattr(self.policy, "steps", None)
        return not candidate.live or (steps is not None and candidate.checkpoints_passed == len(steps))

    def update(self, index: int, part: FinishedLogits) -> bool:
        """Take the next stretch of candidate ``index``; True when the policy stops it now."""
        candidate = self.candidate(index)
        if not candidate.live:
            return False
        before = candidate.running.count
        candidate.running.add(part)
        if candidate.running.count == before and not part.think_starts.size and not part.think_ends.size:
            return False
        policy = self.policy
        if isinstance(policy, RelativePolicy):
            stop = False
            while candidate.checkpoints_passed < len(policy.steps) and (
                candidate.running.count >= policy.steps[candidate.checkpoints_passed]
            ):
                stop = self._checkpoint(candidate, candidate.checkpoints_passed) or stop
                candidate.checkpoints_passed += 1
                if stop:
                    break
            return stop
        return self._threshold(candidate, policy)

    def _decide(self, candidate: Sibling, decision: Decision) -> bool:
        decision.stopped = _stopped_within_min_keep(self.policy, decision.stop, self.kept)
        candidate.decisions.append(decision)
        if decision.stopped:
            candidate.pruned_at_step = decision.step
            candidate.live = False
            self.kept -= 1
        return decision.stopped

    def _checkpoint(self, candidate: Sibling, checkpoint: int) -> bool:
        score = candidate.running.score
        arrivals = self.arrivals[checkpoint]
        allowed, stop = self.policy.decide(checkpoint, arrivals, score)
        arrivals.append(score)
        decision = Decision(candidate.running.count, score, stop, False, self.kept, checkpoint, len(arrivals) - 1, allowed)
        return self._decide(candidate, decision)

    def _threshold(self, candidate: Sibling, policy: AbsolutePolicy) -> bool:
        running = candidate.running
        if running.count < policy.min_steps:
            return False
        score = running.score if policy.window is None else running.window_score(policy.window)
        if not policy.stops(running.count, score):
            return False
        return self._decide(candidate, Decision(running.count, score, True, False, self.kept))


def replay(policy: Policy, logs: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """The decisions ``policy`` takes over a group's logged inputs (``Decision.to_json`` per
    candidate index): each decision's ``stop`` and ``stopped`` recomputed from its score, arrival and
    the group's count of unpruned candidates, with the arrivals ordered as logged. Equal to ``logs`` when the engine
    decided as the policy says."""
    replayed = {index: [dict(d) for d in decisions] for index, decisions in logs.items()}
    if isinstance(policy, RelativePolicy):
        for checkpoint in range(len(policy.steps)):
            entries = sorted(
                (d for decisions in replayed.values() for d in decisions if d["checkpoint"] == checkpoint),
                key=lambda d: d["arrival"],
            )
            scores: list[float] = []
            for entry in entries:
                entry["allowed"], entry["stop"] = policy.decide(checkpoint, scores, entry["score"])
                scores.append(entry["score"])
                entry["stopped"] = _stopped_within_min_keep(policy, entry["stop"], entry["kept"])
        return replayed
    for decisions in replayed.values():
        for entry in decisions:
            entry["stop"] = policy.stops(entry["step"], entry["score"])
            entry["stopped"] = _stopped_within_min_keep(policy, entry["stop"], entry["kept"])
    return replayed


def _stopped_within_min_keep(policy: Policy, stop: bool, kept: int) -> bool:
    """Whether a candidate the policy asks to ``stop`` does stop: not when that would leave fewer
    than ``min_keep`` of the ``kept`` unpruned candidates of its group."""
    return stop and kept - 1 >= policy.min_keep


# The key the front end adds to an n > 1 request's extra_args (``frontend.parent_request_init``):
# [the parent's request id, n]. No ``sprm_`` prefix: it is the plugin's bookkeeping, not an option.
GROUP_KEY = "xbai_sprm_group"
OPTION = "sprm_prune"


@dataclass
class Member:
    group: SiblingGroup
    index: int
    delivered: int = 0  # positions before this one have been scored into the running score


class Pruner:
    """The scheduler's pruned requests: their groups, and how far each has been read.

    ``observe`` is called after every engine step for each ``watched`` member: those its policy may
    still stop (a relative policy's candidate that passed its last checkpoint is settled, and only
    its record is kept). In the common case (one new token, neither a step token nor a marker) it
    only moves a counter. Otherwise the new stretch (step candidates, their logits from the KV-slot
    store, markers) goes to the group's policy.
    """

    def __init__(self, step_token_ids, think_start_id: int, think_end_id: int) -> None:
        self.members: dict[str, Member] = {}
        self.watched: dict[str, Member] = {}
        self.groups: dict[str, SiblingGroup] = {}
        self._interesting = frozenset(step_token_ids) | {think_start_id, think_end_id}

    def add(self, request_id: str, extra_args) -> None:
        """Track a request whose ``extra_args`` hold ``sprm_prune`` (checked by the front end)."""
        group_id, size = extra_args.get(GROUP_KEY) or (request_id, 1)
        index = 0
        if group_id != request_id:  # a child of an n > 1 request: "{index}_{parent id}"
            head, _, parent = request_id.partition("_")
            index = int(head) if parent == group_id and head.isdigit() else 0
        group = self.groups.get(group_id)
        if group is None:
            policy = parse_policy(extra_args[OPTION])
            group = self.groups[group_id] = SiblingGroup(policy, int(size), group_id)
        group.members += 1
        self.members[request_id] = self.watched[request_id] = Member(group, index)

    def observe(self, request_id: str, token_ids, read_part) -> bool:
        """Read what member ``request_id`` decoded since the last call; True when its policy stops it.

        token_ids: prompt and output so far; read_part(request_id, tokens, first_position) ->
        ``FinishedLogits`` of that stretch (``CacheSlotLogits.finished_logits`` over the request's
        block table).
        """
        member = self.members[request_id]
        end = len(token_ids) - 1  # positions before the last one know their successor
        if end <= member.delivered:
            return False
        if end == member.delivered + 1 and token_ids[end] not in self._interesting:
            member.delivered = end  # position end - 1 opens no step, and no marker came
            return False
        part = read_part(request_id, token_ids[member.delivered : end + 1], member.delivered)
        member.delivered = end
        stop = member.group.update(member.index, part)
        if member.group.settled(member.index):
            del self.watched[request_id]
        return stop

    def record(self, request_id: str) -> dict | None:
        """A member's pruning record so far (the step it was pruned at, or None, and its decisions),
        or None for a request that is not a member."""
        member = self.members.get(request_id)
        if member is None:
            return None
        candidate = member.group.candidate(member.index)
        return {"pruned_at_step": candidate.pruned_at_step, "decisions": [d.to_json() for d in candidate.decisions]}

    def finish(self, request_id: str) -> dict | None:
        """Forget a member that stopped (pruned, finished or aborted); its pruning record, or None
        for a request that is not a member."""
        record = self.record(request_id)
        member = self.members.pop(request_id, None)
        self.watched.pop(request_id, None)
        if member is None:
            return None
        group = member.group
        group.finished(member.index)
        group.members -= 1
        if group.members == 0:
            self.groups.pop(group.key, None)
        return record
