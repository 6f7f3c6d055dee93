"""One owner per rule: the oracle and DecodeScorer apply the step-candidate and thinking-region rules
by calling ``xbai_kernels.semantics``, never a copy of their own; and the owner's event form of the
rule (``scored_events``) agrees with its token form (``scored_mask``).

The vLLM plugin's path (its recorder, then its front end at finish) is one of ``RULE_CALLERS``."""

from __future__ import annotations

import pytest
import torch

from xbai_kernels import DecodeScorer, SPRMHead, StepRule, semantics, step_mask
from xbai_kernels.ops import reference

RULE = StepRule(step_token_ids=(5, 6), think_start_id=1, think_end_id=2)
# A trajectory with a region, a run of step tokens, a step right after <think>, and one after </think>.
IDS = [9, 1, 5, 7, 5, 6, 8, 3, 5, 2, 7, 5, 4]
EXPECTED = [3, 7]  # 0 and 10 lie outside the region, 1 is <think>, 4 is inside a run


def _oracle_step_mask():
    ids = torch.tensor(IDS)
    cu = torch.tensor([0, len(IDS)], dtype=torch.int32)
    return reference.step_mask(ids, RULE.step_table(), RULE.think_start_id, RULE.think_end_id, cu)


def _decode_scorer_result():
    torch.manual_seed(0)
    head = SPRMHead(8).eval()
    scorer = DecodeScorer(head, RULE, num_slots=1, capacity=32)
    prompt = torch.tensor(IDS[:4])
    scorer.prefill(0, torch.randn(3, 8), prompt, 0)
    for position in range(3, len(IDS) - 1):
        scorer.step(torch.randn(1, 8), torch.tensor([IDS[position + 1]]), torch.tensor([0]), torch.tensor([position]))
    return scorer.result(0, num_tokens=len(IDS)).positions


def _public_step_mask():
    return step_mask(torch.tensor(IDS), RULE)


def _vllm_path():
    """The vLLM plugin: the V2 recorder over one prefill of the trajectory (the oracle backend on the
    CPU), the scheduler's store by KV-cache slot and its read at stop, then the front end's scoring."""
    import numpy as np

    from xbai_kernels.vllm.logit_store import CacheSlotLogits
    from xbai_kernels.vllm.recorder import EngineStepRecorder
    from xbai_kernels.vllm.results import region_positions, score_steps

    torch.manual_seed(0)
    block_size = 4
    recorder = EngineStepRecorder(SPRMHead(8).eval(), RULE, vocab_size=16, max_tokens=32, max_requests=2,
                                  block_size=block_size)
    rows = len(IDS) - 1  # every token but the last is scheduled; the last is the one sampled after it
    table = torch.tensor([IDS], dtype=torch.int32)
    block_ids = [5, 2, 7, 1]  # the request's block table: position p sits in slot block_ids[p // 4] * 4 + p % 4
    cache_slots = torch.tensor([block_ids[p // block_size] * block_size + p % block_size for p in range(rows)])
    query_start_loc = torch.tensor([0, rows, rows], dtype=torch.int32)  # one request; max_requests + 1 entries
    step = recorder.record(torch.randn(rows, 8), table[0, :rows], torch.arange(rows), cache_slots, query_start_loc,
                           table, np.array([0]), rows, rows)
    store = CacheSlotLogits(num_blocks=8, block_size=block_size, rule=RULE)
    store.write(step.rows())
    finished = store.finished_logits(IDS, block_ids)
    return score_steps(*region_positions(finished, len(IDS))).step_positions


RULE_CALLERS = {
    "vLLM recorder and front end": (_vllm_path, list),
    "oracle step_mask": (_oracle_step_mask, lambda mask: mask.nonzero().squeeze(-1).tolist()),
    "DecodeScorer": (_decode_scorer_result, lambda positions: positions.tolist()),
    "public step_mask on the CPU": (_public_step_mask, lambda mask: mask.nonzero().squeeze(-1).tolist()),
}


@pytest.mark.parametrize("caller", sorted(RULE_CALLERS))
@pytest.mark.parametrize("rule_function", ["opens_step", "in_thinking_region"])
def test_each_path_calls_the_rule_owner(monkeypatch, caller, rule_function):
    run, positions_of = RULE_CALLERS[caller]
    original = getattr(semantics, rule_function)
    calls = []

    def counted(*args, **kwargs):
        calls.append(rule_function)
        return original(*args, **kwargs)

    monkeypatch.setattr(semantics, rule_function, counted)
    assert positions_of(run()) == EXPECTED
    assert calls, f"{caller} did not call semantics.{rule_function}"


def test_a_path_that_bypassed_the_owner_would_be_caught(monkeypatch):
    """The owner's answer decides the result: a changed rule changes what every caller scores."""
    monkeypatch.setattr(semantics, "in_thinking_region", lambda positions, *rest: positions == positions)
    for name, (run, positions_of) in RULE_CALLERS.items():
        assert positions_of(run()) != EXPECTED, name


def test_events_and_tokens_give_the_same_positions():
    ids = torch.tensor(IDS)
    step_table = RULE.step_table()
    following = torch.cat([ids[1:], torch.tensor([semantics.NO_TOKEN])])
    candidate = semantics.opens_step(ids, following, step_table, RULE.think_start_id)
    kinds = semantics.marker_kind(ids, RULE.think_start_id, RULE.think_end_id)
    positions = torch.arange(len(IDS))
    # Every candidate and marker once, then the candidate at 3 again with a newer logit (a recomputed position).
    events = torch.cat([positions[candidate] * 4 + semantics.EVENT_STEP, positions[kinds != 0] * 4 + kinds[kinds != 0]])
    events = torch.cat([events, torch.tensor([3 * 4 + semantics.EVENT_STEP])])
    logits = torch.arange(events.numel(), dtype=torch.float32)
    found, found_logits = semantics.scored_events(events, logits, num_tokens=len(IDS))
    assert found.tolist() == EXPECTED == semantics.step_positions(ids, RULE).tolist()
    assert found_logits[0] == logits[-1]  # the latest recording of position 3 wins


def test_trajectory_score_is_the_clamped_geometric_mean_and_zero_without_steps():
    scores = torch.tensor([0.5, 0.125, 0.0])
    expected = torch.exp(torch.log(torch.tensor([0.5, 0.125, semantics.SCORE_CLAMP_MIN])).mean())
    assert torch.allclose(semantics.trajectory_score(scores), expected)
    assert semantics.trajectory_score(torch.empty(0)) == 0.0


def test_reward_outcome_reads_point_one_as_ignored_in_float32():
    correct, valid = semantics.reward_outcome(torch.tensor([1.0, 0.1, 0.0, 0.6], dtype=torch.float64))
    assert correct.tolist() == [True, False, False, True]
    assert valid.tolist() == [True, False, True, True]


def test_the_step_rule_as_two_lookups_equals_the_rule_over_every_pair():
    """``opens_step_tables``: the host's factorised form of ``opens_step``, over every (token i,
    token i+1) of a small vocabulary with a run of step ids and both markers, NO_TOKEN after."""
    import numpy as np

    table = RULE.step_table("cpu", size=12).numpy()
    may_open, is_step = semantics.opens_step_tables(table, RULE.think_start_id)
    current, following = np.meshgrid(np.arange(12), np.arange(-1, 12), indexing="ij")
    expected = semantics.opens_step(current.ravel(), following.ravel(), table, RULE.think_start_id)
    assert np.array_equal(may_open[current.ravel()] & is_step[following.ravel()], expected)
    assert expected.any() and not expected.all()
