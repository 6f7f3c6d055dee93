"""Bad inputs to every public function get a clear ValueError/TypeError naming the problem.

A device mismatch is simulated on the CPU with the ``meta`` device.
"""

from __future__ import annotations

import pytest
import torch

import xbai_kernels as xk

D = 16
RULE = xk.StepRule((7,), 3, 4)
META = torch.device("meta")


@pytest.fixture
def head() -> xk.SPRMHead:
    torch.manual_seed(0)
    return xk.SPRMHead(D).eval()


def _ids(n: int = 6) -> torch.Tensor:
    return torch.tensor([1, 3, 2, 7, 4, 5][:n] + [1] * max(0, n - 6))


def _cu(*values, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ----- cu_seqlens (shared by step_mask and score_trajectories) ----------------------------------

BAD_CU_SEQLENS = [
    pytest.param(_cu(1, 6), ValueError, "must start at 0", id="not-starting-at-0"),
    pytest.param(_cu(0, 4, 2, 6), ValueError, "non-decreasing", id="not-increasing"),
    pytest.param(_cu(0, 3, 5), ValueError, "must end at the number of tokens 6, got 5", id="short-end"),
    pytest.param(_cu(0, 3, 7), ValueError, "must end at the number of tokens 6, got 7", id="long-end"),
    pytest.param(_cu(0), ValueError, "at least 2 entries", id="one-entry"),
    pytest.param(_cu(0, 6).reshape(1, 2), ValueError, "cu_seqlens must be 1-D", id="2-D"),
    pytest.param(torch.tensor([0.0, 6.0]), TypeError, "cu_seqlens must have dtype", id="float"),
    pytest.param([0, 6], TypeError, "cu_seqlens must be a torch.Tensor", id="list"),
    pytest.param(torch.zeros(2, dtype=torch.int32, device=META), ValueError, "cu_seqlens is on meta", id="device"),
]


@pytest.mark.parametrize("cu_seqlens, error, words", BAD_CU_SEQLENS)
def test_step_mask_bad_cu_seqlens(cu_seqlens, error, words):
    with pytest.raises(error, match=words):
        xk.step_mask(_ids(), RULE, cu_seqlens)


@pytest.mark.parametrize("cu_seqlens, error, words", BAD_CU_SEQLENS)
def test_score_trajectories_bad_cu_seqlens(head, cu_seqlens, error, words):
    with pytest.raises(error, match=words) as raised:
        xk.score_trajectories(torch.randn(6, D), _ids(), head, RULE, cu_seqlens)
    # The user called score_trajectories: the message names it, not the op that found the problem.
    assert str(raised.value).startswith("score_trajectories: ")


# ----- step_mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_ids, error, words",
    [
        (torch.ones(2, 3, dtype=torch.int64), ValueError, "input_ids must be 1-D, got shape"),
        (torch.tensor(5), ValueError, "input_ids must be 1-D"),
        (torch.ones(4), TypeError, "input_ids must have dtype in .*int32, int64.*got torch.float32"),
        (torch.ones(4, dtype=torch.int16), TypeError, "input_ids must have dtype"),
        ([1, 2, 7], TypeError, "input_ids must be a torch.Tensor, got list"),
    ],
)
def test_step_mask_bad_ids(input_ids, error, words):
    with pytest.raises(error, match=words):
        xk.step_mask(input_ids, RULE)


def test_step_mask_bad_rule():
    with pytest.raises(TypeError, match="rule must be a StepRule, got tuple"):
        xk.step_mask(_ids(), (7, 3, 4))


# ----- score_trajectories -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden, input_ids, error, words",
    [
        (torch.randn(6 * D), _ids(), ValueError, "hidden must be 2-D"),
        (torch.randn(1, 6, D), _ids(), ValueError, "hidden must be 2-D"),
        (torch.ones(6, D, dtype=torch.int64), _ids(), TypeError, "hidden must have dtype in .*float32"),
        (torch.randn(6, D, dtype=torch.float64), _ids(), TypeError, "hidden must have dtype"),
        (torch.randn(6, D + 1), _ids(), ValueError, f"hidden has size {D + 1} but the head expects {D}"),
        (torch.randn(5, D), _ids(), ValueError, "input_ids has 6 tokens but hidden has 5 rows"),
        (torch.randn(6, D), _ids().reshape(2, 3), ValueError, "input_ids must be 1-D"),
        (torch.randn(6, D), _ids().float(), TypeError, "input_ids must have dtype"),
        (torch.empty(6, D, device=META), _ids(), ValueError, "hidden is on meta but the other inputs are on cpu"),
        (torch.randn(6, D), _ids().to(META), ValueError, "input_ids is on meta but the other inputs are on cpu"),
    ],
)
def test_score_trajectories_bad_inputs(head, hidden, input_ids, error, words):
    with pytest.raises(error, match=words):
        xk.score_trajectories(hidden, input_ids, head, RULE)


def test_score_trajectories_bad_head_and_rule(head):
    linear = torch.nn.Linear(D, 1)
    with pytest.raises(TypeError, match="head must be an SPRMHead, got Linear"):
        xk.score_trajectories(torch.randn(6, D), _ids(), linear, RULE)
    with pytest.raises(TypeError, match="rule must be a StepRule"):
        xk.score_trajectories(torch.randn(6, D), _ids(), head, [7])


# ----- SPRMHead.forward ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden, error, words",
    [
        (torch.randn(3, D + 2), ValueError, f"must end in the hidden size {D}, got shape \\(3, {D + 2}\\)"),
        (torch.tensor(1.0), ValueError, "must end in the hidden size"),
        (torch.ones(3, D, dtype=torch.int32), TypeError, "hidden must have dtype"),
        (torch.empty(3, D, device=META), ValueError, "hidden is on meta"),
        ("not a tensor", TypeError, "hidden must be a torch.Tensor, got str"),
    ],
)
def test_head_forward_bad_inputs(head, hidden, error, words):
    with pytest.raises(error, match=words):
        head(hidden)


# ----- sprm_loss ----------------------------------------------------------------------------------


def _loss_inputs():
    return torch.randn(3, 8), torch.tensor([1.0, 0.0, 0.1])


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"logits": torch.randn(8)}, ValueError, "logits must be 2-D"),
        ({"logits": torch.randn(2, 3, 8)}, ValueError, "logits must be 2-D"),
        ({"logits": torch.ones(3, 8, dtype=torch.int64)}, TypeError, "logits must have dtype"),
        ({"rewards": torch.tensor([1.0, 0.0])}, ValueError, r"rewards must have shape \[3\]"),
        ({"rewards": torch.ones(3, 7)}, ValueError, r"rewards must have shape"),
        ({"rewards": torch.tensor([1, 0, 1])}, TypeError, "rewards must have dtype"),
        ({"rewards": torch.empty(3, device=META)}, ValueError, "rewards is on meta"),
        ({"step_mask": torch.ones(3, 8)}, TypeError, "step_mask must have dtype in \\(bool\\)"),
        ({"step_mask": torch.ones(3, 7, dtype=torch.bool)}, ValueError, r"step_mask has shape \(3, 7\)"),
        ({"step_mask": torch.ones(3, 8, dtype=torch.bool, device=META)}, ValueError, "step_mask is on meta"),
    ],
)
def test_sprm_loss_bad_inputs(change, error, words):
    logits, rewards = _loss_inputs()
    kwargs = {"logits": logits, "rewards": rewards, "step_mask": None, **change}
    with pytest.raises(error, match=words):
        xk.sprm_loss(**kwargs)


def test_sprm_loss_accepts_per_position_rewards():
    logits, rewards = _loss_inputs()
    per_sequence, _ = xk.sprm_loss(logits, rewards)
    per_position, _ = xk.sprm_loss(logits, rewards[:, None].expand(3, 8))
    torch.testing.assert_close(per_sequence, per_position)


# ----- sprm_head_loss -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"hidden": torch.randn(D)}, ValueError, rf"hidden must be \[..., {D}\]"),
        ({"hidden": torch.randn(2, 5, D + 1)}, ValueError, rf"hidden must be \[..., {D}\]"),
        ({"hidden": torch.ones(2, 5, D, dtype=torch.int64)}, TypeError, "hidden must have dtype"),
        ({"hidden": torch.empty(2, 5, D, device=META)}, ValueError, "hidden is on meta"),
        ({"step_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, r"step_mask has shape \(2, 4\), expected \(2, 5\)"),
        ({"step_mask": torch.ones(2, 5, dtype=torch.int64)}, TypeError, "step_mask must have dtype"),
        ({"step_mask": torch.ones(2, 5, dtype=torch.bool, device=META)}, ValueError, "step_mask is on meta"),
        ({"rewards": torch.ones(3)}, ValueError, r"rewards must have shape \[2\]"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p must be in"),
        ({"head": torch.nn.Linear(D, 1)}, TypeError, "head must be an SPRMHead"),
    ],
)
def test_sprm_head_loss_bad_inputs(head, change, error, words):
    kwargs = {
        "hidden": torch.randn(2, 5, D),
        "head": head,
        "step_mask": torch.ones(2, 5, dtype=torch.bool),
        "rewards": torch.tensor([1.0, 0.0]),
        **change,
    }
    with pytest.raises(error, match=words):
        xk.sprm_head_loss(**kwargs)


# ----- DecodeScorer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"num_slots": 0}, ValueError, "num_slots must be a positive int, got 0"),
        ({"num_slots": 2.0}, ValueError, "num_slots must be a positive int"),
        ({"capacity": -1}, ValueError, "capacity must be a positive int, got -1"),
        ({"capacity": True}, ValueError, "capacity must be a positive int"),
        ({"rule": (7,)}, TypeError, "rule must be a StepRule, got tuple"),
        ({"head": torch.nn.Linear(D, 1)}, TypeError, "head must be an SPRMHead, got Linear"),
    ],
)
def test_decode_scorer_bad_construction(head, kwargs, error, words):
    with pytest.raises(error, match=words):
        xk.DecodeScorer(**{"head": head, "rule": RULE, "num_slots": 2, "capacity": 8, **kwargs})


def _step_args(batch: int = 2) -> dict:
    return {
        "hidden": torch.randn(batch, D),
        "sampled_ids": torch.tensor([7, 1][:batch]),
        "slots": torch.tensor([0, 1][:batch]),
        "positions": torch.tensor([4, 9][:batch]),
    }


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"hidden": torch.randn(2, D + 1)}, ValueError, f"hidden has size {D + 1}, the head expects {D}"),
        ({"hidden": torch.randn(3, D)}, ValueError, "hidden has 3 rows, expected 2"),
        ({"hidden": torch.randn(2, 1, D)}, ValueError, "hidden must be 2-D"),
        ({"hidden": torch.ones(2, D, dtype=torch.int32)}, TypeError, "hidden must have dtype"),
        ({"hidden": torch.empty(2, D, device=META)}, ValueError, "hidden is on meta"),
        ({"sampled_ids": torch.tensor([7.0, 1.0])}, TypeError, "sampled_ids must have dtype"),
        ({"sampled_ids": torch.tensor([[7, 1]])}, ValueError, "sampled_ids must be 1-D"),
        ({"slots": torch.tensor([0])}, ValueError, "slots has 1 entries, sampled_ids has 2"),
        ({"positions": torch.tensor([4, 9, 10])}, ValueError, "positions has 3 entries, sampled_ids has 2"),
        ({"positions": torch.tensor([4, 9], device=META)}, ValueError, "positions is on meta"),
        ({"slots": torch.tensor([0.0, 1.0])}, TypeError, "slots must have dtype"),
    ],
)
def test_decode_scorer_bad_step(head, change, error, words):
    scorer = xk.DecodeScorer(head, RULE, 2, 8)
    with pytest.raises(error, match=words):
        scorer.step(**{**_step_args(), **change})


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"slot": 2}, ValueError, r"slot must be an int in \[0, 2\), got 2"),
        ({"slot": -1}, ValueError, "slot must be an int"),
        ({"slot": torch.tensor(0)}, ValueError, "slot must be an int"),
        ({"input_ids": torch.zeros(0, dtype=torch.int64), "hidden": torch.randn(0, D)}, ValueError, "at least one token"),
        ({"input_ids": torch.tensor([1, 2, 7])}, ValueError, "hidden has 3 rows, expected 2"),
        ({"input_ids": torch.tensor([1.0, 2.0, 7.0, 1.0])}, TypeError, "input_ids must have dtype"),
        ({"input_ids": torch.tensor([1, 2, 7, 1], device=META)}, ValueError, "input_ids is on meta"),
        ({"hidden": torch.randn(3, D - 1)}, ValueError, f"hidden has size {D - 1}"),
    ],
)
def test_decode_scorer_bad_prefill(head, change, error, words):
    scorer = xk.DecodeScorer(head, RULE, 2, 8)
    kwargs = {"slot": 0, "hidden": torch.randn(3, D), "input_ids": torch.tensor([1, 2, 7, 1]), "start_position": 0}
    with pytest.raises(error, match=words):
        scorer.prefill(**{**kwargs, **change})


# ----- StepRule and checkpoints (their own files test the details) --------------------------------


def test_step_rule_and_from_pretrained_errors_are_value_or_type_errors(tmp_path):
    from xbai_kernels.head import CheckpointError

    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(ValueError):
        xk.StepRule((), 3, 4)
    with pytest.raises(ValueError, match="does not exist"):
        xk.SPRMHead.from_pretrained(tmp_path / "missing")
