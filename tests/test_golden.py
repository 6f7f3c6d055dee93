"""The released code's own numbers (tests/data/sprm_reference.safetensors) reproduced by the package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import xbai_kernels as xk

GOLDEN_PATH = Path(__file__).parent / "data" / "sprm_reference.safetensors"
# docs/semantics.md / the golden vectors: an fp32 path lands within 1e-5 of the released numbers.
ATOL = 1e-5
RTOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def test_golden_file_holds_every_case(golden):
    assert [t.index for t in golden.trajectories] == list(range(len(golden.trajectories)))
    assert len(golden.trajectories) == 24
    assert [c.index for c in golden.losses] == [0, 1, 2, 3]
    assert golden.losses[2].ranks == 2


def test_mask_exact(golden, trajectory_index):
    case = golden.trajectories[trajectory_index]
    mask = xk.step_mask(case.ids, case.rule)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, case.mask)


def test_mask_exact_int32_ids(golden, trajectory_index):
    case = golden.trajectories[trajectory_index]
    assert torch.equal(xk.step_mask(case.ids.int(), case.rule), case.mask)


@pytest.mark.parametrize("d", [64, 96])
def test_scores_one_trajectory(golden, trajectory_index, d):
    case = golden.trajectories[trajectory_index]
    result = xk.score_trajectories(case.hidden[d], case.ids, golden.head(d), case.rule)
    assert len(result) == 1
    assert torch.equal(result.positions, case.mask.nonzero().squeeze(-1))
    _close(result.logits, case.logits[d])
    _close(result.step_scores, case.scores[d])
    _close(result.scores, torch.tensor([case.value[d]]))
    one = result[0]
    assert torch.equal(one.positions, result.positions)
    assert one.score == pytest.approx(case.value[d], abs=ATOL, rel=RTOL)
    if case.mask.sum() == 0:
        assert one.score == 0.0  # a trajectory with no scored step gets 0.0


@pytest.mark.parametrize("d", [64, 96])
def test_scores_packed(golden, d):
    """All trajectories sharing a step set, packed back to back (varlen layout), in one call."""
    head = golden.head(d)
    by_rule: dict[xk.StepRule, list] = {}
    for case in golden.trajectories:
        by_rule.setdefault(case.rule, []).append(case)
    for rule, cases in by_rule.items():
        lengths = [case.ids.numel() for case in cases]
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        ids = torch.cat([case.ids for case in cases])
        hidden = torch.cat([case.hidden[d] for case in cases])

        assert torch.equal(xk.step_mask(ids, rule, cu_seqlens), torch.cat([case.mask for case in cases]))
        result = xk.score_trajectories(hidden, ids, head, rule, cu_seqlens)
        assert len(result) == len(cases)
        for s, case in enumerate(cases):
            one = result[s]
            assert torch.equal(one.positions, case.mask.nonzero().squeeze(-1))
            _close(one.step_scores, case.scores[d])
            assert one.score == pytest.approx(case.value[d], abs=ATOL, rel=RTOL)
            lo, hi = int(result.cu_steps[s]), int(result.cu_steps[s + 1])
            _close(result.logits[lo:hi], case.logits[d])
            assert torch.equal(result.sequence_index[lo:hi], torch.full((hi - lo,), s))


@pytest.mark.parametrize("d", [64, 96])
def test_head_forward_at_scored_rows(golden, d):
    """SPRMHead.forward itself (eval mode) gives the released logits at the scored rows."""
    head = golden.head(d)
    for case in golden.trajectories:
        _close(head(case.hidden[d][case.mask]), case.logits[d])


def test_loss_single_rank(golden, loss_index):
    case = golden.losses[loss_index]
    if case.ranks != 1:
        pytest.skip("multi-rank case: see test_loss_two_ranks_gloo")
    loss, stats = xk.sprm_loss(case.logits, case.rewards)
    _close(loss.reshape(1), case.values)
    _close(stats["step_score_geomean"], case.geomean)


def test_loss_case3_only_correct_answers(golden):
    """Only positives: w_pos = 1.5 * 0 / (...) = 0, so the loss is exactly 0 (the released weights)."""
    case = golden.losses[3]
    assert bool((case.rewards > 0.5).all())
    loss, stats = xk.sprm_loss(case.logits, case.rewards)
    assert float(loss) == 0.0
    assert float(stats["num_negative"]) == 0.0


def test_loss_case2_geomean_without_group(golden):
    """The monitoring geometric mean is per response, so it needs no communication."""
    case = golden.losses[2]
    _, stats = xk.sprm_loss(case.logits, case.rewards)
    _close(stats["step_score_geomean"], case.geomean)


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str, golden_path: str) -> None:
    import torch.distributed as dist
    from safetensors import safe_open

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with safe_open(golden_path, "pt") as f:
            logits, rewards = f.get_tensor("loss_logits_2"), f.get_tensor("loss_reward_2")
        rows = slice(3 * rank, 3 * rank + 3)
        group = dist.new_group([0, 1])
        loss, stats = xk.sprm_loss(logits[rows], rewards[rows], process_group=group)
        _, stats_default = xk.sprm_loss(logits[rows], rewards[rows], process_group=True)
        torch.save(
            {
                "loss": loss.detach(),
                "num_positive": stats["num_positive"],
                "num_negative": stats["num_negative"],
                "num_positive_default_group": stats_default["num_positive"],
                "geomean": stats["step_score_geomean"],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_loss_two_ranks_gloo(golden, tmp_path):
    """Case 2 with two real processes: the positive/negative counts are all-reduced over gloo."""
    import torch.multiprocessing as mp

    case = golden.losses[2]
    init_file = tmp_path / "rendezvous"
    mp.spawn(
        _rank_main,
        args=(2, str(init_file), str(tmp_path), str(GOLDEN_PATH)),
        nprocs=2,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, result in enumerate(results):
        _close(result["loss"].reshape(1), case.values[rank : rank + 1])
        _close(result["geomean"], case.geomean[3 * rank : 3 * rank + 3])
        assert torch.equal(result["num_positive_default_group"], result["num_positive"])
    # Both ranks see the global counts, equal to the single-process counts over all six rows.
    _, whole = xk.sprm_loss(case.logits, case.rewards)
    for result in results:
        assert float(result["num_positive"]) == float(whole["num_positive"])
        assert float(result["num_negative"]) == float(whole["num_negative"])
    # Without the all-reduce a rank's loss differs from the golden one: the communication matters.
    local_loss, _ = xk.sprm_loss(case.logits[:3], case.rewards[:3])
    assert abs(float(local_loss) - float(case.values[0])) > 1e-4
