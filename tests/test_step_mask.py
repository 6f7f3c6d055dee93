"""step_mask against a direct, loop-based restatement of the released inference rule (property tests)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xbai_kernels as xk

THINK_START, THINK_END = 3, 4
# A small vocabulary so that step tokens, runs of them and the markers collide often.
VOCAB = 12


def spec_mask(ids: list[int], step_ids: set[int], think_start: int, think_end: int) -> list[bool]:
    """docs/semantics.md, 'Which positions are scored', written as plainly as possible."""
    n = len(ids)
    start = ids.index(think_start) if ids.count(think_start) == 1 else 0
    end = ids.index(think_end) if ids.count(think_end) == 1 else n
    scored = []
    for i in range(n):
        next_is_step = i + 1 < n and ids[i + 1] in step_ids
        opens_run = ids[i] not in step_ids
        not_after_think = ids[i] != think_start
        inside = start < i < end
        scored.append(next_is_step and opens_run and not_after_think and inside)
    return scored


@st.composite
def rules(draw) -> xk.StepRule:
    candidates = [t for t in range(VOCAB) if t not in (THINK_START, THINK_END)]
    step_ids = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=4, unique=True))
    return xk.StepRule(tuple(step_ids), THINK_START, THINK_END)


@st.composite
def trajectories(draw, rule: xk.StepRule, max_size: int = 60) -> list[int]:
    # Bias toward the interesting tokens: step ids and the two markers.
    interesting = st.sampled_from([*rule.step_token_ids, THINK_START, THINK_END])
    token = st.one_of(st.integers(0, VOCAB - 1), interesting)
    return draw(st.lists(token, min_size=0, max_size=max_size))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_single_trajectory_matches_spec(data):
    rule = data.draw(rules())
    ids = data.draw(trajectories(rule))
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    mask = xk.step_mask(torch.tensor(ids, dtype=dtype), rule)
    assert mask.dtype == torch.bool and mask.shape == (len(ids),)
    assert mask.tolist() == spec_mask(ids, set(rule.step_token_ids), THINK_START, THINK_END)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_packed_equals_each_sequence_alone(data):
    """Each packed sequence gets its own thinking region and its last token opens no step."""
    rule = data.draw(rules())
    sequences = data.draw(st.lists(trajectories(rule, max_size=25), min_size=1, max_size=6))
    ids = torch.tensor([t for seq in sequences for t in seq], dtype=torch.int64)
    lengths = [len(seq) for seq in sequences]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    expected = [b for seq in sequences for b in spec_mask(seq, set(rule.step_token_ids), THINK_START, THINK_END)]
    assert xk.step_mask(ids, rule, cu_seqlens).tolist() == expected


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_markers_occurring_exactly_once_bound_the_region(data):
    """With one <think> and one </think> nothing at or outside them is scored."""
    rule = data.draw(rules())
    before, inside, after = (data.draw(trajectories(rule, max_size=20)) for _ in range(3))
    strip = lambda seq: [t for t in seq if t not in (THINK_START, THINK_END)]  # noqa: E731
    ids = strip(before) + [THINK_START] + strip(inside) + [THINK_END] + strip(after)
    mask = xk.step_mask(torch.tensor(ids), rule).tolist()
    start, end = ids.index(THINK_START), ids.index(THINK_END)
    assert not any(mask[: start + 1]) and not any(mask[end:])
    assert mask == spec_mask(ids, set(rule.step_token_ids), THINK_START, THINK_END)


def test_examples_by_hand():
    rule = xk.StepRule((7, 8), THINK_START, THINK_END)
    # position:          0  1  2  3  4  5  6  7  8  9
    ids = torch.tensor([1, 3, 7, 5, 7, 8, 6, 7, 4, 9])
    # 1: '<think>' before a step token opens no step; 3: opens the run 7 8; 6 -> 7 is a step;
    # the region is 1 < i < 8.
    assert xk.step_mask(ids, rule).nonzero().squeeze(-1).tolist() == [3, 6]
    # Two <think>: the region starts at 0, so position 1 ('<think>' itself) still opens no step.
    ids2 = torch.tensor([5, 7, 3, 7, 3, 2, 7])
    assert xk.step_mask(ids2, rule).nonzero().squeeze(-1).tolist() == [5]
    # Position 0 is never inside (start < i), even without markers.
    assert xk.step_mask(torch.tensor([5, 7, 2, 7]), rule).nonzero().squeeze(-1).tolist() == [2]


def test_empty_inputs():
    rule = xk.StepRule((7,), THINK_START, THINK_END)
    assert xk.step_mask(torch.zeros(0, dtype=torch.int64), rule).shape == (0,)
    cu_seqlens = torch.tensor([0, 0, 0], dtype=torch.int32)
    assert xk.step_mask(torch.zeros(0, dtype=torch.int64), rule, cu_seqlens).shape == (0,)


def test_int64_cu_seqlens_accepted():
    rule = xk.StepRule((7,), THINK_START, THINK_END)
    ids = torch.tensor([1, 2, 7, 1, 2, 7])
    expected = xk.step_mask(ids, rule, torch.tensor([0, 3, 6], dtype=torch.int32))
    assert torch.equal(xk.step_mask(ids, rule, torch.tensor([0, 3, 6], dtype=torch.int64)), expected)
    assert expected.tolist() == [False, True, False, False, True, False]
