"""The released code's golden numbers through the public API with the Triton backend forced.

Also ``score_trajectories(..., capacity=)``, the no-sync packed path, against the golden vectors.
Runs under the interpreter without a GPU (see ``test_triton_ops``), on the GPU when there is one.
"""

from __future__ import annotations

import random

import pytest
import torch

import xbai_kernels as xk
from test_decode_scorer import EngineSimulation, _golden_rules, _golden_trajectories
from test_triton_ops import env  # noqa: F401  (fixture)

ATOL = RTOL = 1e-5


@pytest.fixture
def triton_forced(env, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("XBAI_KERNELS_STRICT", "1")
    return env[1]


def _packed_by_rule(golden, d, device):
    """Per step-token set: (rule, cases, cu_seqlens int32, ids, hidden) of all its trajectories packed."""
    by_rule: dict[xk.StepRule, list] = {}
    for case in golden.trajectories:
        by_rule.setdefault(case.rule, []).append(case)
    for rule, cases in by_rule.items():
        lengths = torch.tensor([case.ids.numel() for case in cases])
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
        ids = torch.cat([case.ids for case in cases])
        hidden = torch.cat([case.hidden[d] for case in cases])
        yield rule, cases, cu_seqlens.to(device), ids.to(device), hidden.to(device)


def _head(golden, d, device):
    return golden.head(d).to(device)


@pytest.mark.parametrize("d", [64, 96])
def test_packed_scores(golden, triton_forced, d):
    device = triton_forced
    head = _head(golden, d, device)
    for rule, cases, cu_seqlens, ids, hidden in _packed_by_rule(golden, d, device):
        result = xk.score_trajectories(hidden, ids, head, rule, cu_seqlens)
        torch.testing.assert_close(result.logits.cpu(), torch.cat([c.logits[d] for c in cases]), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            result.scores.cpu(), torch.tensor([c.value[d] for c in cases]), atol=ATOL, rtol=RTOL
        )


@pytest.mark.parametrize("d", [64, 96])
def test_capacity_path_equals_golden(golden, triton_forced, d):
    device = triton_forced
    head = _head(golden, d, device)
    for rule, cases, cu_seqlens, ids, hidden in _packed_by_rule(golden, d, device):
        num_steps = sum(int(c.mask.sum()) for c in cases)
        result = xk.score_trajectories(hidden, ids, head, rule, cu_seqlens, capacity=num_steps + 5)
        assert result.logits.shape == (num_steps + 5,)
        assert int(result.cu_steps[-1]) == num_steps
        torch.testing.assert_close(
            result.logits[:num_steps].cpu(), torch.cat([c.logits[d] for c in cases]), atol=ATOL, rtol=RTOL
        )
        torch.testing.assert_close(
            result.scores.cpu(), torch.tensor([c.value[d] for c in cases]), atol=ATOL, rtol=RTOL
        )
        padding = slice(num_steps, None)
        assert torch.all(result.positions[padding] == -1) and torch.all(result.sequence_index[padding] == -1)
        assert torch.all(result.logits[padding] == 0) and torch.all(result.step_scores[padding] == 0)
        for s, case in enumerate(cases):
            assert torch.equal(result[s].positions.cpu(), case.mask.nonzero().squeeze(-1))


def test_capacity_overflow_marks_truncated_trajectories_nan(golden, triton_forced):
    device = triton_forced
    d = 64
    head = _head(golden, d, device)
    rule, cases, cu_seqlens, ids, hidden = next(iter(_packed_by_rule(golden, d, device)))
    steps = [int(c.mask.sum()) for c in cases]
    capacity = max(1, sum(steps) // 2)
    result = xk.score_trajectories(hidden, ids, head, rule, cu_seqlens, capacity=capacity)
    before = 0
    for s, case in enumerate(cases):
        fits = steps[s] == 0 or before + steps[s] <= capacity  # a trajectory without steps loses nothing
        if fits:
            assert result.scores[s].item() == pytest.approx(case.value[d], abs=ATOL, rel=RTOL)
        else:
            assert torch.isnan(result.scores[s])
        before += steps[s]
    assert int(result.cu_steps[-1]) == capacity


def test_capacity_single_trajectory_and_bad_capacity(golden, triton_forced):
    device = triton_forced
    case = next(c for c in golden.trajectories if c.mask.sum() > 2)
    head = _head(golden, 96, device)
    result = xk.score_trajectories(case.hidden[96].to(device), case.ids.to(device), head, case.rule, capacity=64)
    assert result.scores[0].item() == pytest.approx(case.value[96], abs=ATOL, rel=RTOL)
    with pytest.raises(ValueError, match="capacity"):
        xk.score_trajectories(case.hidden[96].to(device), case.ids.to(device), head, case.rule, capacity=0)


def test_decode_scorer_engine_simulation(golden, triton_forced):
    """DecodeScorer driven like an engine (chunked prefill, batched decode steps) on the Triton kernel."""
    if triton_forced.type != "cpu":
        pytest.skip("EngineSimulation feeds CPU tensors; the GPU tests drive DecodeScorer on the device")
    d = 64
    head = _head(golden, d, triton_forced)
    for rule in _golden_rules(golden):
        rng = random.Random(3)
        trajectories = _golden_trajectories(golden, rule, d, rng, trim=True)
        simulation = EngineSimulation(xk.DecodeScorer(head, rule, 4, capacity=256), seed=3)
        simulation.run(trajectories)
        assert simulation.finished == len(trajectories)
