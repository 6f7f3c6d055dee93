"""DecodeScorer fed the way an engine feeds it gives exactly the released rule on the finished trajectory.

An engine prefills a prompt (in chunks), then decodes one token per step for many trajectories at
once, reuses slots after a trajectory ends, sometimes recomputes positions (preemption) and may
trim tokens a stop string matched. ``EngineSimulation`` does all of that with random choices and
compares every finished slot with the golden vectors (or with ``score_trajectories``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

import xbai_kernels as xk

ATOL = RTOL = 1e-5


@dataclass
class Trajectory:
    """What to feed: ids int64 [L_fed], hidden [L_fed, d]; what to expect after trimming to ``num_tokens``."""

    ids: torch.Tensor
    hidden: torch.Tensor
    num_tokens: int
    expected_positions: torch.Tensor
    expected_logits: torch.Tensor
    expected_score: float
    name: str = ""


@dataclass
class _Running:
    trajectory: Trajectory
    ops: list = field(default_factory=list)  # ("prefill", a, b) | ("step", i)


def _chunks(rng: random.Random, begin: int, end: int) -> list[tuple[str, int, int]]:
    """Random prefill chunks covering positions [begin, end)."""
    ops, a = [], begin
    while a < end:
        b = min(end, a + rng.randint(1, 9))
        ops.append(("prefill", a, b))
        a = b
    return ops


def _plan(rng: random.Random, fed_length: int, recompute: bool) -> list:
    """Prefill a prompt of p positions, then one step per position p .. L-2 (the token after each is sampled).

    The first prefill always includes token 0 (a chunk of zero positions when p == 0), since a slot
    learns its tokens only from what it is fed.
    """
    p = rng.randint(0, fed_length - 1)
    ops = _chunks(rng, 0, p) or [("prefill", 0, 0)]
    ops += [("step", i) for i in range(p, fed_length - 1)]
    if recompute and fed_length > 2:
        # Preemption: at some point all positions so far are computed again, then decoding goes on.
        at = rng.randint(1, len(ops))
        resume = ops[at][1] if at < len(ops) else fed_length - 1
        ops[at:at] = _chunks(rng, 0, resume) or [("prefill", 0, 0)]
    return ops


class EngineSimulation:
    def __init__(self, scorer: xk.DecodeScorer, seed: int, recompute: bool = False) -> None:
        self.scorer = scorer
        self.rng = random.Random(seed)
        self.recompute = recompute
        self.finished = 0

    def run(self, trajectories: list[Trajectory]) -> None:
        pending = list(trajectories)
        running: dict[int, _Running] = {}
        free = list(range(self.scorer.num_slots))
        while pending or running:
            while free and pending:
                slot = free.pop(self.rng.randrange(len(free)))
                trajectory = pending.pop(0)
                running[slot] = _Running(trajectory, _plan(self.rng, trajectory.ids.numel(), self.recompute))
            # Prefill work goes one slot at a time, as chunked prefill schedules it.
            for slot in [s for s, r in running.items() if r.ops and r.ops[0][0] == "prefill"]:
                if self.rng.random() < 0.7:
                    self._prefill(slot, running[slot])
            # A decode step batches a random subset of the slots that are decoding, in random order.
            decoding = [s for s, r in running.items() if r.ops and r.ops[0][0] == "step"]
            if decoding:
                batch = self.rng.sample(decoding, self.rng.randint(1, len(decoding)))
                self._step(batch, running)
            for slot in [s for s, r in running.items() if not r.ops]:
                self._check(slot, running.pop(slot).trajectory)
                self.scorer.reset([slot] if self.rng.random() < 0.5 else torch.tensor([slot]))
                free.append(slot)

    def _prefill(self, slot: int, running: _Running) -> None:
        _, a, b = running.ops.pop(0)
        t = running.trajectory
        self.scorer.prefill(slot, t.hidden[a:b], t.ids[a : b + 1], a)

    def _step(self, batch: list[int], running: dict[int, _Running]) -> None:
        positions = [running[s].ops.pop(0)[1] for s in batch]
        hidden = torch.stack([running[s].trajectory.hidden[i] for s, i in zip(batch, positions)])
        sampled = torch.stack([running[s].trajectory.ids[i + 1] for s, i in zip(batch, positions)])
        self.scorer.step(hidden, sampled, torch.tensor(batch), torch.tensor(positions))

    def _check(self, slot: int, t: Trajectory) -> None:
        trimmed = t.num_tokens != t.ids.numel()
        result = self.scorer.result(slot, num_tokens=t.num_tokens if trimmed or self.rng.random() < 0.5 else None)
        assert torch.equal(result.positions, t.expected_positions), t.name
        torch.testing.assert_close(result.logits, t.expected_logits, atol=ATOL, rtol=RTOL, msg=t.name)
        torch.testing.assert_close(result.step_scores, torch.sigmoid(t.expected_logits), atol=ATOL, rtol=RTOL)
        assert result.score == pytest.approx(t.expected_score, abs=ATOL, rel=RTOL), t.name
        self.finished += 1


def _junk_tail(rng: random.Random, rule: xk.StepRule, d: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens a stop string trims: rich in step tokens and markers, so keeping them would change the result."""
    pool = [*rule.step_token_ids, rule.think_start_id, rule.think_end_id, 1, 2, 5]
    ids = [rng.choice(rule.step_token_ids)] + [rng.choice(pool) for _ in range(length - 1)]
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.tensor(ids), torch.randn(length, d, generator=generator)


def _golden_trajectories(golden, rule: xk.StepRule, d: int, rng: random.Random, trim: bool) -> list[Trajectory]:
    out = []
    for case in golden.trajectories:
        if case.rule != rule:
            continue
        ids, hidden = case.ids, case.hidden[d]
        if trim:
            tail_ids, tail_hidden = _junk_tail(rng, rule, d, rng.randint(1, 6))
            ids, hidden = torch.cat([ids, tail_ids]), torch.cat([hidden, tail_hidden])
        out.append(
            Trajectory(
                ids=ids,
                hidden=hidden,
                num_tokens=case.ids.numel(),
                expected_positions=case.mask.nonzero().squeeze(-1),
                expected_logits=case.logits[d],
                expected_score=case.value[d],
                name=case.name,
            )
        )
    return out


def _golden_rules(golden) -> list[xk.StepRule]:
    return sorted({case.rule for case in golden.trajectories}, key=lambda r: r.step_token_ids)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_slots", [1, 3, 5])
def test_golden_trajectories_many_chunkings(golden, seed, num_slots):
    """Every golden trajectory, twice (slots reused after reset), random chunkings and interleavings."""
    d = 64 if seed % 2 == 0 else 96
    head = golden.head(d)
    for rule in _golden_rules(golden):
        rng = random.Random(seed * 100 + num_slots)
        trajectories = _golden_trajectories(golden, rule, d, rng, trim=False) * 2
        rng.shuffle(trajectories)
        simulation = EngineSimulation(xk.DecodeScorer(head, rule, num_slots, capacity=256), seed)
        simulation.run(trajectories)
        assert simulation.finished == len(trajectories)


@pytest.mark.parametrize("seed", range(4))
def test_golden_trajectories_with_recompute(golden, seed):
    """A preempted slot recomputes positions it already recorded: they must not count twice."""
    head = golden.head(64)
    for rule in _golden_rules(golden):
        rng = random.Random(seed)
        simulation = EngineSimulation(xk.DecodeScorer(head, rule, 4, capacity=512), seed, recompute=True)
        simulation.run(_golden_trajectories(golden, rule, 64, rng, trim=False))


@pytest.mark.parametrize("seed", range(4))
def test_golden_trajectories_trimmed_to_num_tokens(golden, seed):
    """Tokens decoded past the final length (a stop string) drop out when result gets num_tokens."""
    head = golden.head(96)
    for rule in _golden_rules(golden):
        rng = random.Random(seed)
        trajectories = _golden_trajectories(golden, rule, 96, rng, trim=True)
        simulation = EngineSimulation(xk.DecodeScorer(head, rule, 3, capacity=512), seed, recompute=seed % 2 == 1)
        simulation.run(trajectories)
        assert simulation.finished == len(trajectories)


def _synthetic(rng: random.Random, rule: xk.StepRule, head: xk.SPRMHead, starts: int, ends: int) -> Trajectory:
    """A random trajectory with exactly ``starts`` <think> and ``ends`` </think>; expected via score_trajectories."""
    length = rng.randint(4, 40)
    body = [rng.choice([*rule.step_token_ids, 1, 2, 5, 6]) for _ in range(length)]
    for marker, count in ((rule.think_start_id, starts), (rule.think_end_id, ends)):
        for _ in range(count):
            body.insert(rng.randrange(len(body) + 1), marker)
    ids = torch.tensor(body)
    hidden = torch.randn(ids.numel(), head.hidden_size, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    expected = xk.score_trajectories(hidden, ids, head, rule)
    return Trajectory(ids, hidden, ids.numel(), expected.positions, expected.logits, float(expected.scores[0]))


@pytest.mark.parametrize("starts", [0, 1, 2, 3])
@pytest.mark.parametrize("ends", [0, 1, 2])
def test_zero_or_several_think_markers(starts, ends):
    torch.manual_seed(starts * 10 + ends)
    head = xk.SPRMHead(64).eval()
    rule = xk.StepRule((7, 8), 3, 4)
    rng = random.Random(starts * 10 + ends)
    trajectories = [_synthetic(rng, rule, head, starts, ends) for _ in range(12)]
    EngineSimulation(xk.DecodeScorer(head, rule, 4, capacity=256), seed=starts + ends, recompute=True).run(trajectories)


def test_trim_removes_a_second_think_end():
    """One </think> in the kept text and another in the trimmed tail: the region must end at the first."""
    torch.manual_seed(0)
    head = xk.SPRMHead(64).eval()
    rule = xk.StepRule((7,), 3, 4)
    kept = torch.tensor([1, 3, 2, 7, 5, 7, 4, 2, 7, 1])
    tail = torch.tensor([4, 2, 7, 1])
    ids = torch.cat([kept, tail])
    hidden = torch.randn(ids.numel(), 64)
    scorer = xk.DecodeScorer(head, rule, 1, capacity=32)
    scorer.prefill(0, hidden[:3], ids[:4], 0)
    for i in range(3, ids.numel() - 1):
        scorer.step(hidden[i : i + 1], ids[i + 1 : i + 2], torch.tensor([0]), torch.tensor([i]))
    expected = xk.score_trajectories(hidden[: kept.numel()], kept, head, rule)
    trimmed = scorer.result(0, num_tokens=kept.numel())
    assert trimmed.positions.tolist() == expected.positions.tolist() == [2, 4]
    untrimmed = scorer.result(0)
    # Two </think> in the untrimmed text: the region runs to the end, so positions 7 and 11 count too.
    assert untrimmed.positions.tolist() == [2, 4, 7, 11]


def test_fresh_and_reset_slots_are_empty():
    head = xk.SPRMHead(16).eval()
    rule = xk.StepRule((7,), 3, 4)
    scorer = xk.DecodeScorer(head, rule, 2, capacity=8)
    empty = scorer.result(1)
    assert empty.positions.numel() == 0 and empty.score == 0.0
    scorer.prefill(0, torch.randn(4, 16), torch.tensor([1, 2, 7, 1, 7]), 0)
    assert scorer.result(0).positions.tolist() == [1, 3]
    scorer.reset(0)
    assert scorer.result(0).positions.numel() == 0
    # After reset the slot has no previous token: a step token sampled first opens no step.
    scorer.step(torch.randn(1, 16), torch.tensor([7]), torch.tensor([0]), torch.tensor([0]))
    assert scorer.result(0).positions.numel() == 0


def test_capacity_overflow_is_reported():
    head = xk.SPRMHead(16).eval()
    rule = xk.StepRule((7,), 3, 4)
    scorer = xk.DecodeScorer(head, rule, 1, capacity=2)
    scorer.prefill(0, torch.randn(6, 16), torch.tensor([1, 7, 1, 7, 1, 7, 2]), 0)
    with pytest.raises(RuntimeError, match="recorded 3 events but capacity is 2"):
        scorer.result(0)


def test_step_and_prefill_leave_no_autograd_graph():
    head = xk.SPRMHead(16)  # parameters require grad, as in a training process
    rule = xk.StepRule((7,), 3, 4)
    scorer = xk.DecodeScorer(head, rule, 1, capacity=8)
    scorer.prefill(0, torch.randn(2, 16), torch.tensor([1, 2, 7]), 0)
    scorer.step(torch.randn(1, 16), torch.tensor([7]), torch.tensor([0]), torch.tensor([2]))
    assert not scorer.result(0).logits.requires_grad
    state = [value for value in vars(scorer).values() if isinstance(value, torch.Tensor)]
    assert state and not any(tensor.requires_grad for tensor in state)
