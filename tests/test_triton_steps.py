"""The packed scorer's bookkeeping kernels (``ops/triton/steps.py``) against the reference ops.

Random packed batches spanning several 1024-token blocks, with sequences that cross block borders,
empty sequences, and thinking markers that occur zero, one or two times. Runs under the interpreter
without a GPU (see ``test_triton_ops``), on the GPU when there is one.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_ops import env, make_head, randn  # noqa: F401  (fixture)

from xbai_kernels.ops import reference

THINK_START, THINK_END = 3, 4
STEP_IDS = (5, 9)
VOCAB = 40


def _table(device):
    table = torch.zeros(VOCAB, dtype=torch.bool)
    table[list(STEP_IDS)] = True
    return table.to(device)


def _packed_batch(lengths: list[int], seed: int, device, dtype=torch.int64):
    """(input_ids [T], cu_seqlens int32 [S + 1]): tokens biased toward step ids, markers 0-2 times."""
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for length in lengths:
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        ids[torch.rand(length, generator=g) < 0.15] = STEP_IDS[0]
        ids[torch.rand(length, generator=g) < 0.05] = STEP_IDS[1]
        ids[(ids == THINK_START) | (ids == THINK_END)] = 0
        for marker in (THINK_START, THINK_END):
            times = int(torch.randint(0, 3, (1,), generator=g)) if length else 0
            for place in torch.randint(0, max(length, 1), (times,), generator=g).tolist():
                ids[place] = marker
        pieces.append(ids)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return torch.cat(pieces).to(device=device, dtype=dtype), cu.to(device)


BATCHES = {
    "one-long": [2500],
    "many-short": [0, 7, 300, 0, 1, 1500, 64, 900, 0],
    "border": [1023, 1, 1024, 2],
    "empty-tail": [40, 0, 0],
}


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_step_mask_and_find_steps_equal_reference(env, name, ids_dtype):  # noqa: F811
    backend, device = env
    ids, cu = _packed_batch(BATCHES[name], seed=len(name), device=device, dtype=ids_dtype)
    table = _table(device)
    mask = backend.step_mask(ids, table, THINK_START, THINK_END, cu)
    expected_mask = reference.step_mask(ids, table, THINK_START, THINK_END, cu)
    assert mask.dtype == torch.bool and torch.equal(mask.cpu(), expected_mask.cpu())
    total_steps = int(expected_mask.sum())
    assert total_steps > 0 or name == "empty-tail"
    for capacity in (None, max(1, total_steps // 3), total_steps + 37):
        got = backend.find_steps(ids, table, THINK_START, THINK_END, cu, capacity)
        want = reference.find_steps(ids, table, THINK_START, THINK_END, cu, capacity)
        for field, a, b in zip(want._fields, got, want):
            assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), (capacity, field)


def test_trajectory_scores_equal_reference_and_repeat_bitwise(env):  # noqa: F811
    backend, device = env
    ids, cu = _packed_batch(BATCHES["many-short"], seed=3, device=device)
    table = _table(device)
    total_steps = int(reference.step_mask(ids, table, THINK_START, THINK_END, cu).sum())
    for capacity in (None, total_steps // 2, total_steps + 5):
        steps = reference.find_steps(ids, table, THINK_START, THINK_END, cu, capacity)
        logits = randn(steps.rows.numel(), device=device, seed=7) * 4
        logits[-1:] = -40.0  # sigmoid below the clamp: SPEC's clamp decides the log
        got = backend.trajectory_scores(logits, steps.cu_steps, steps.complete)
        want = reference.trajectory_scores(logits, steps.cu_steps, steps.complete)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5, equal_nan=True)
        again = backend.trajectory_scores(logits, steps.cu_steps, steps.complete)
        assert torch.equal(got[1].nan_to_num(-1), again[1].nan_to_num(-1))
    assert torch.isnan(got[1]).sum() == 0  # the last capacity holds every step


def test_head_logits_rows_skips_padding_past_num_rows(env):  # noqa: F811
    backend, device = env
    d = 32
    weights = make_head(d, device)
    hidden = randn(50, d, device=device, seed=2)
    rows = torch.tensor([3, 7, 7, 40, 0, 0, 0, 0, 0, 0, 0], device=device)
    live = torch.tensor([4], device=device)
    got = backend.head_logits_rows(hidden, rows, *weights, num_rows=live)
    want = reference.head_logits_rows(hidden, rows, *weights, num_rows=live)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[4:] == 0)
    with pytest.raises(ValueError, match="num_rows"):
        backend.head_logits_rows(hidden, rows, *weights, num_rows=torch.tensor([1, 2], device=device))


def test_bad_inputs_name_the_problem(env):  # noqa: F811
    backend, device = env
    ids, cu = _packed_batch([10], seed=1, device=device)
    with pytest.raises((TypeError, ValueError), match="step_table"):
        backend.find_steps(ids, _table(device).long(), THINK_START, THINK_END, cu)
    with pytest.raises((TypeError, ValueError), match="input_ids"):
        backend.step_mask(ids.float(), _table(device), THINK_START, THINK_END, cu)
    bad_end = torch.tensor([0, 4, 12], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="must end at the number of tokens 10, got 12"):
        backend.find_steps(ids, _table(device), THINK_START, THINK_END, bad_end)
    with pytest.raises(ValueError, match="must start at 0"):
        backend.find_steps(ids, _table(device), THINK_START, THINK_END, bad_end + 1)
    # With a capacity cu_seqlens is trusted, unread on the host: bad values stay inside the buffers.
    steps = backend.find_steps(ids, _table(device), THINK_START, THINK_END, bad_end, capacity=8)
    assert steps.rows.shape == (8,) and int(steps.rows.max()) < ids.numel()
    logits = torch.zeros(3, device=device)
    with pytest.raises(ValueError, match="cu_steps"):
        backend.trajectory_scores(logits, torch.zeros(3, dtype=torch.int64, device=device),
                                  torch.ones(3, dtype=torch.bool, device=device))
