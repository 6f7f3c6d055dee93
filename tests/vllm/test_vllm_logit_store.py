"""The scheduler's logits by KV-cache slot (``logit_store``), without an engine: rows filed by slot,
read back through a block table, and a prefix-cache hit that reads another request's block, down
to the block's last position, whose successor differs between the two requests.
"""

from __future__ import annotations

import numpy as np
import torch

from xbai_kernels import SPRMHead, StepRule
from xbai_kernels.ops import reference
from xbai_kernels.vllm import records
from xbai_kernels.vllm.logit_store import CacheSlotLogits
from xbai_kernels.vllm.results import region_positions, score_steps

STEP, THINK, END_THINK = 5, 1, 2
RULE = StepRule((STEP,), THINK, END_THINK)
BLOCK_SIZE = 4
HIDDEN = 8


def _slots(block_ids, positions) -> list[int]:
    return [block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


def _compute(store, head, ids, hidden, first: int, block_ids) -> None:
    """One prefill of ``ids[first:-1]`` (the last id is the token sampled after it), through the
    worker's row rule and masked head (the reference ops), filed in ``store``."""
    positions = list(range(first, len(ids) - 1))
    n = len(positions)
    keep, out_slots = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int32)
    reference.engine_step_rows(
        torch.tensor(ids[first:-1], dtype=torch.int32), torch.tensor(positions), torch.tensor(_slots(block_ids, positions)),
        torch.tensor([0, n], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
        torch.tensor([ids], dtype=torch.int32), RULE.step_table(), THINK, BLOCK_SIZE, keep, out_slots,
    )
    with torch.no_grad():
        logits = reference.head_logits_masked(hidden[first:-1], keep, *head.weights)
    store.write(np.stack((out_slots.numpy(), logits.numpy().view(np.int32))))


def test_rows_are_filed_by_slot_and_a_recomputed_slot_takes_the_latest():
    store = CacheSlotLogits(num_blocks=4, block_size=BLOCK_SIZE, rule=RULE)
    slots = np.array([5, 6, 9])
    store.write(records.encode(slots, np.array([0, 2]), np.array([0.5, -1.0], dtype=np.float32)))  # row 1 keeps none
    assert store.values[5] == np.float32(0.5) and store.values[9] == np.float32(-1.0)
    assert np.isnan(store.values[6]) and np.isnan(store.values[0])  # kept nothing; never written
    store.write(records.encode(slots[:1], np.array([0]), np.array([2.5], dtype=np.float32)))
    assert store.values[5] == np.float32(2.5)


def test_positions_are_read_through_the_block_table():
    store = CacheSlotLogits(num_blocks=4, block_size=BLOCK_SIZE, rule=RULE)
    store.values[:] = np.arange(16, dtype=np.float32)
    # Block 2 holds positions 0-3, block 0 positions 4-7; nothing holds position 8.
    assert store.by_position([2, 0], 6).tolist() == [8, 9, 10, 11, 0, 1]
    assert store.by_position([2, 0], 6, start=3).tolist() == [11, 0, 1]
    assert np.isnan(store.by_position([2, 0], 9)[8])


def test_a_prefix_hit_reads_the_computing_request_logits_at_every_step_it_needs():
    """B shares A's first block (same tokens, so same h there) and diverges right after it: B's
    token 4 is a step token, A's is not, so position 3 opens a step for B only. The worker kept
    position 3's logit anyway (the last of its block), so B's scores are exact."""
    torch.manual_seed(0)
    head = SPRMHead(HIDDEN).eval()
    a_ids = [9, 8, 3, 6, 4, 7, STEP, 8]
    b_ids = [9, 8, 3, 6, STEP, 4, STEP, 3, STEP, 7]
    store = CacheSlotLogits(num_blocks=8, block_size=BLOCK_SIZE, rule=RULE)
    a_blocks, b_blocks = [3, 6], [3, 1, 5]  # B's first block is A's, read from the prefix cache
    a_hidden = torch.randn(len(a_ids), HIDDEN)
    b_hidden = torch.cat([a_hidden[:BLOCK_SIZE], torch.randn(len(b_ids) - BLOCK_SIZE, HIDDEN)])
    _compute(store, head, a_ids, a_hidden, 0, a_blocks)
    _compute(store, head, b_ids, b_hidden, BLOCK_SIZE, b_blocks)  # the hit: positions 0-3 are not computed

    result = score_steps(*region_positions(store.finished_logits(b_ids, b_blocks), len(b_ids)))
    assert result.error is None and result.step_positions == [3, 5, 7]
    with torch.no_grad():
        want = torch.sigmoid(reference.head_logits(b_hidden[[3, 5, 7]], *head.weights)).tolist()
    assert np.allclose(result.step_scores, want, rtol=0, atol=1e-6)


def test_a_position_nobody_recorded_is_an_error_not_a_wrong_score():
    store = CacheSlotLogits(num_blocks=4, block_size=BLOCK_SIZE, rule=RULE)
    ids = [9, 8, STEP, 4, 4, STEP, 7]
    store.values[[1, 4]] = [0.25, 0.75]  # positions 1 and 4 in blocks [0, 1]; then position 4 lost
    store.values[4] = np.nan
    result = score_steps(*region_positions(store.finished_logits(ids, [0, 1]), len(ids)))
    assert result.score is None and result.step_positions == [1, 4]
    assert "(first: 4)" in result.error
