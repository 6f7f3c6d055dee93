"""Best-of-N pruning policies (``xbai_kernels.vllm.pruning``) without an engine: option checks, the
running score against the finished-trajectory score, the decisions, and their offline replay."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from xbai_kernels import StepRule
from xbai_kernels.vllm import pruning
from xbai_kernels.vllm.logit_store import finished_logits
from xbai_kernels.vllm.results import region_positions, score_steps

STEP, THINK_START, THINK_END = 5, 1, 2
RULE = StepRule((STEP,), THINK_START, THINK_END)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("relative", "JSON object"),
        ([4, 8], "takes an object"),
        ({"steps": [4]}, '"policy"'),
        ({"policy": "relative", "steps": [4, 8], "keep": [0.5]}, "same, non-zero length"),
        ({"policy": "relative", "steps": [8, 4], "keep": [0.5, 0.25]}, "increasing"),
        ({"policy": "relative", "steps": [4, 8], "keep": [0.25, 0.5]}, "do not grow"),
        ({"policy": "relative", "steps": [4], "keep": [1.5]}, "(0, 1]"),
        ({"policy": "relative", "steps": [0], "keep": [0.5]}, "positive integer"),
        ({"policy": "relative", "min_keep": -1}, "min_keep"),
        ({"policy": "relative", "treshold": 0.3}, "no key 'treshold'"),
        ({"policy": "absolute"}, "threshold"),
        ({"policy": "absolute", "threshold": 1.0}, "(0, 1)"),
        ({"policy": "absolute", "threshold": 0.3, "window": 0}, "window"),
    ],
)
def test_bad_policies_name_the_problem(value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        pruning.normalize_policy(value)


def test_policies_are_normalized_with_their_defaults():
    assert pruning.normalize_policy({"policy": "relative"}) == {
        "policy": "relative", "steps": [4, 8], "keep": [0.5, 0.25], "min_keep": 1,
    }
    absolute = pruning.normalize_policy('{"policy": "absolute", "threshold": 0.25, "window": 3}')
    assert absolute == {"policy": "absolute", "threshold": 0.25, "min_steps": 4, "window": 3, "min_keep": 1}
    assert pruning.parse_policy(absolute) == pruning.AbsolutePolicy(0.25, 4, 3, 1)


def _random_trajectory(rng: random.Random, length: int) -> list[int]:
    tokens = [rng.choice([3, 4, 6, 7, STEP, STEP, 8, 9]) for _ in range(length)]
    for marker in (THINK_START, THINK_END):
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            tokens[rng.randrange(length)] = marker
    return tokens


def _stretch(tokens, first: int, logits) -> "pruning.FinishedLogits":
    """The stretch of a trajectory from position ``first`` on, as ``CacheSlotLogits.finished_logits``
    returns it: candidates from ``first``, markers after it, absolute positions."""
    part = finished_logits(tokens, RULE, logits)
    if first:
        part.candidates += first
        part.think_starts = part.think_starts[part.think_starts > 0] + first
        part.think_ends = part.think_ends[part.think_ends > 0] + first
    return part


@pytest.mark.parametrize("seed", range(20))
def test_running_score_is_the_score_of_the_trajectory_so_far(seed):
    """Fed in random stretches, the running score equals the front end's score of every prefix."""
    rng = random.Random(seed)
    tokens = _random_trajectory(rng, 120)
    logits = np.array([rng.uniform(-4, 4) for _ in tokens], dtype=np.float32)
    running, delivered = pruning.RunningScore(), 0
    while delivered < len(tokens) - 1:
        end = min(len(tokens) - 1, delivered + rng.choice([1, 1, 1, 2, 5]))
        running.add(_stretch(tokens[delivered : end + 1], delivered, logits[delivered:end]))
        delivered = end
        whole = finished_logits(tokens[: end + 1], RULE, logits[:end])
        expected = score_steps(*region_positions(whole, end + 1))
        assert running.count == len(expected.step_scores)
        assert running.score == pytest.approx(expected.score, rel=1e-12, abs=0)


def _part(steps: list[float], first: int = 0) -> "pruning.FinishedLogits":
    """A stretch holding one step per logit, at positions first + 1, first + 2, ... (position 0
    is never inside a thinking region)."""
    return pruning.FinishedLogits(
        np.arange(first + 1, first + 1 + len(steps)), np.array(steps, dtype=np.float32),
        np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), first + len(steps) + 2,
    )


def _logit(score: float) -> float:
    return math.log(score / (1 - score))


def test_relative_policy_keeps_the_better_arrivals_and_min_keep():
    group = pruning.SiblingGroup(pruning.RelativePolicy((2,), (0.5,), min_keep=2), size=4)
    # Arrivals at the second step, in this order, with these running scores.
    order = [(0, 0.6), (1, 0.9), (2, 0.3), (3, 0.95)]
    stopped = {index: group.update(index, _part([_logit(score)] * 2)) for index, score in order}
    # 0: first, kept (at least one continues). 1: best of two, kept (allowed 1). 2: third of three,
    # allowed 1: stopped. 3: best of four (allowed 2): kept.
    assert stopped == {0: False, 1: False, 2: True, 3: False}
    assert group.kept == 3
    candidate = group.candidates[2]
    assert candidate.pruned_at_step == 2 and candidate.decisions[0].allowed == 1 and candidate.decisions[0].arrival == 2
    # A late arrival below every other: the policy says stop, min_keep still allows it (3 kept -> 2).
    assert group.update(4, _part([_logit(0.1)] * 2)) is True and group.kept == 2
    # Now min_keep = 2 overrules the policy.
    assert group.update(5, _part([_logit(0.05)] * 2)) is False
    assert group.candidates[5].decisions[0].stop and not group.candidates[5].decisions[0].stopped


def test_relative_keep_fractions_are_of_the_whole_group():
    """keep [0.5, 0.25]: half continue past the first checkpoint, and half of those past the second."""
    policy = pruning.RelativePolicy((1, 2), (0.5, 0.25))
    assert [policy.allowed(0, k) for k in (1, 2, 3, 4, 5)] == [1, 1, 1, 2, 2]
    assert [policy.allowed(1, k) for k in (1, 2, 3, 4, 5)] == [1, 1, 1, 2, 2]
    assert pruning.RelativePolicy((1,), (1.0,)).allowed(0, 7) == 7


def test_relative_shares_hold_over_random_arrival_orders():
    """Candidates of random quality arriving in random order: about keep[j] x N continue past each
    checkpoint, not more (the first arrival, which always continues, must not tilt the share)."""
    rng = random.Random(0)
    size, trials, survivors = 32, 400, [0, 0]
    for _ in range(trials):
        group = pruning.SiblingGroup(pruning.RelativePolicy((1, 2), (0.5, 0.25)), size)
        alive = list(range(size))
        for checkpoint in range(2):
            rng.shuffle(alive)
            alive = [i for i in alive if not group.update(i, _part([rng.uniform(-3, 3)], first=checkpoint))]
            survivors[checkpoint] += len(alive)
    assert 15.0 <= survivors[0] / trials <= 17.0 and 7.0 <= survivors[1] / trials <= 9.0, survivors


def test_absolute_policy_with_and_without_a_window():
    plain = pruning.SiblingGroup(pruning.AbsolutePolicy(0.5, min_steps=3), size=2)
    assert plain.update(0, _part([_logit(0.9), _logit(0.2)])) is False  # two steps: too early
    assert plain.update(0, _part([_logit(0.2)], first=2)) is True  # mean of (0.9, 0.2, 0.2) < 0.5
    windowed = pruning.SiblingGroup(pruning.AbsolutePolicy(0.5, min_steps=1, window=1), size=2)
    assert windowed.update(0, _part([_logit(0.2), _logit(0.9)])) is False  # last step 0.9
    assert windowed.update(0, _part([_logit(0.4)], first=2)) is True


@pytest.mark.parametrize("seed", range(10))
def test_replay_recomputes_every_logged_decision(seed):
    rng = random.Random(seed)
    for policy in (pruning.RelativePolicy((1, 3), (0.5, 0.25), min_keep=2), pruning.AbsolutePolicy(0.4, 2, None, 2)):
        group = pruning.SiblingGroup(policy, size=8)
        live = list(range(8))
        while live:
            index = rng.choice(live)
            if group.update(index, _part([rng.uniform(-3, 3)], first=len(group.candidate(index).running.positions))):
                live.remove(index)
            elif rng.random() < 0.05:  # finished on its own
                group.finished(index)
                live.remove(index)
        logs = {i: [d.to_json() for d in c.decisions] for i, c in group.candidates.items()}
        assert any(d["stopped"] for log in logs.values() for d in log), "the run was meant to prune"
        assert pruning.replay(policy, logs) == logs
        tampered = {i: [dict(d) for d in log] for i, log in logs.items()}
        entry = next(d for log in tampered.values() for d in log if d["stopped"])
        entry["stopped"] = False
        assert pruning.replay(policy, tampered) != tampered


def test_pruner_reads_only_what_a_step_added():
    pruner = pruning.Pruner((STEP,), THINK_START, THINK_END)
    extra = {pruning.OPTION: {"policy": "absolute", "threshold": 0.5, "min_steps": 1}, pruning.GROUP_KEY: ["p", 2]}
    pruner.add("1_p", extra)
    assert pruner.members["1_p"].index == 1 and pruner.groups["p"].size == 2
    reads = []

    def read(request_id, tokens, first):
        assert request_id == "1_p"
        reads.append((list(tokens), first))
        return _stretch(tokens, first, np.full(len(tokens) - 1, _logit(0.2), dtype=np.float32))

    assert pruner.observe("1_p", [7, 8, 9], read) is False  # the prompt: one read
    assert pruner.observe("1_p", [7, 8, 9, 6], read) is False  # nothing to read: no call
    assert len(reads) == 1
    assert pruner.observe("1_p", [7, 8, 9, 6, STEP], read) is True  # position 3 opens a step scored 0.2
    assert reads[-1] == ([6, STEP], 3)
    record = pruner.finish("1_p")
    assert record["pruned_at_step"] == 1 and record["decisions"][0]["stopped"]
    assert not pruner.members and not pruner.groups


def test_a_members_record_is_readable_before_it_finishes():
    pruner = pruning.Pruner((STEP,), THINK_START, THINK_END)
    pruner.add("r", {pruning.OPTION: {"policy": "absolute", "threshold": 0.5, "min_steps": 1, "min_keep": 0}})
    assert pruner.record("r") == {"pruned_at_step": None, "decisions": []}
    assert pruner.record("not a member") is None and pruner.finish("not a member") is None
    assert pruner.finish("r") == {"pruned_at_step": None, "decisions": []} and not pruner.members


def test_a_candidate_past_the_last_checkpoint_is_no_longer_watched():
    """Per step the scheduler reads only the members a policy may still stop: a relative policy's
    candidate that passed its last checkpoint keeps its record but costs nothing more."""
    pruner = pruning.Pruner((STEP,), THINK_START, THINK_END)
    extra = {pruning.OPTION: {"policy": "relative", "steps": [1, 2], "keep": [1.0, 1.0]}, pruning.GROUP_KEY: ["p", 2]}
    pruner.add("0_p", extra)
    pruner.add("1_p", extra)

    def read(request_id, tokens, first):
        return _stretch(tokens, first, np.full(len(tokens) - 1, _logit(0.7), dtype=np.float32))

    tokens = [7, 8, 6, STEP]
    assert pruner.observe("0_p", tokens, read) is False and "0_p" in pruner.watched  # step 1 of 2
    tokens += [6, STEP]
    assert pruner.observe("0_p", tokens, read) is False
    assert "0_p" not in pruner.watched and "0_p" in pruner.members  # settled after its last checkpoint
    assert [d["checkpoint"] for d in pruner.record("0_p")["decisions"]] == [0, 1]
    assert set(pruner.watched) == {"1_p"}
    assert pruner.finish("0_p")["pruned_at_step"] is None and pruner.finish("1_p") is not None
    assert not pruner.members and not pruner.watched and not pruner.groups
