"""The front end without an engine: vLLM's real OutputProcessor and RequestOutputCollector fed scripted
engine outputs (the merge path of streamed requests), the request options, and the finish-time
scoring against SPEC's rule (``scoring.step_mask``) and the former whole-sequence implementation.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from vllm_helpers import requires_vllm
from xbai_kernels import StepRule, semantics
from xbai_kernels.scoring import step_mask
from xbai_kernels.vllm import options
from xbai_kernels.vllm.results import SCAN_CHUNK_TOKENS, StepLogits, StepScan, score_from_records, score_positions

STEP, THINK, END_THINK = 3, 1, 2
RULE = StepRule((STEP, 7), THINK, END_THINK)


def _spec_positions(ids: list[int], rule: StepRule = RULE) -> list[int]:
    if not ids:
        return []
    return step_mask(torch.tensor(ids, dtype=torch.int64), rule).nonzero().squeeze(-1).tolist()


def _former_score(ids: list[int], by_position: dict[int, float], rule: StepRule = RULE):
    """The whole-sequence implementation this module replaced (torch over every position)."""
    positions = _spec_positions(ids, rule)
    if any(p not in by_position for p in positions):
        return None, [], positions
    step_scores = torch.sigmoid(torch.tensor([by_position[p] for p in positions], dtype=torch.float32))
    score = float(semantics.trajectory_score(step_scores))
    return (score if math.isfinite(score) else None), step_scores.tolist(), positions


# ----- the scan and the finish-time scoring (no vLLM needed) ---------------------------------------


def _adversarial(rng: random.Random, length: int) -> list[int]:
    # Dense steps, runs of step tokens, markers that occur 0, 1 or several times, a step token right
    # after <think>, ids past the step table (500) and id 0.
    vocabulary = [0, THINK, END_THINK, STEP, STEP, 7, 4, 5, 6, 500, 8]
    return [rng.choice(vocabulary) for _ in range(length)]


def test_scan_matches_spec_rule_on_random_chunks_and_cuts():
    rng = random.Random(0)
    for _ in range(3000):
        ids = _adversarial(rng, rng.randrange(0, 70))
        scan = StepScan(RULE)
        start = 0
        while start < len(ids):
            size = rng.randrange(1, 9)
            scan.extend(ids[start : start + size] if rng.random() < 0.5 else np.array(ids[start : start + size]))
            start += size
        # The whole trajectory, and the trajectory a stop string would leave (any prefix).
        for length in {len(ids), rng.randrange(0, len(ids) + 1)}:
            assert scan.positions(length).tolist() == _spec_positions(ids[:length]), (ids, length)


def test_scan_of_long_trajectories_in_engine_chunks():
    rng = random.Random(1)
    for length in (1, SCAN_CHUNK_TOKENS - 1, SCAN_CHUNK_TOKENS, SCAN_CHUNK_TOKENS + 1, 5000):
        ids = [rng.choice([4, 5, 6, 8, 9, STEP]) for _ in range(length)]
        for at in sorted(rng.sample(range(length), min(3, length))):
            ids[at] = rng.choice([THINK, END_THINK])
        scan = StepScan(RULE)
        for start in range(0, length, SCAN_CHUNK_TOKENS):
            scan.extend(ids[start : start + SCAN_CHUNK_TOKENS])
        assert scan.positions().tolist() == _spec_positions(ids)


def test_scan_with_a_large_step_set():
    # SPEC's Chinese set holds thousands of ids: membership by table, ids past it are no steps.
    rule = StepRule(tuple(range(1000, 4000, 3)), 10, 11)
    rng = random.Random(2)
    ids = [rng.choice([10, 11, 5, 1000, 1003, 3997, 3998, 5000, 2500]) for _ in range(4000)]
    scan = StepScan(rule)
    scan.extend(ids)
    assert scan.positions().tolist() == _spec_positions(ids, rule)


def test_scan_refuses_a_length_it_has_not_seen():
    scan = StepScan(RULE)
    scan.extend([4, STEP])
    with pytest.raises(ValueError, match="outside the 2 scanned tokens"):
        scan.positions(3)


def test_scores_equal_the_former_torch_implementation():
    rng = random.Random(3)
    checked = 0
    for _ in range(500):
        ids = _adversarial(rng, rng.randrange(0, 300))
        by_position = {p: rng.gauss(0.0, 3.0) for p in range(len(ids))}
        records = StepLogits()
        # A recomputed position (preemption) is recorded again: the latest record must win.
        stale = list(by_position)
        records.add(stale, [99.0] * len(stale))
        records.add(list(by_position), [np.float32(v).item() for v in by_position.values()])
        by_position = {p: np.float32(v).item() for p, v in by_position.items()}
        want_score, want_steps, want_positions = _former_score(ids, by_position)
        got = score_from_records(ids, records, RULE)
        assert got.error is None
        assert got.step_positions == want_positions
        # float32 step scores: torch's float32 sigmoid is off by up to a few ulp (2^-24 near 0.5).
        assert np.allclose(got.step_scores, want_steps, rtol=0, atol=2**-22)
        assert math.isclose(got.score, want_score, rel_tol=1e-6, abs_tol=1e-12)
        checked += len(want_positions)
    assert checked > 1000


def test_missing_record_is_an_error_not_a_wrong_score():
    ids = [4, THINK, 5, STEP, 6, STEP, END_THINK]
    records = StepLogits()
    records.add([2], [0.5])
    result = score_from_records(ids, records, RULE)
    assert result.score is None and result.step_positions == [2, 4]
    assert "1 scored position(s) (first: 4)" in result.error


def test_no_step_scores_zero():
    records = StepLogits()
    assert score_positions(np.zeros(0, dtype=np.int64), records).score == 0.0
    assert score_from_records([], records, RULE).score == 0.0


# ----- request options (no vLLM needed) ----------------------------------------------------------


def test_options_take_booleans_only():
    assert options.parse_options(None) == {"sprm_score_prompt": False}
    assert options.parse_options({"sprm_score_prompt": True, "other_plugin": "x"})["sprm_score_prompt"] is True
    for bad in ("false", "no", "0", 2.5, 1, 0, None, [True]):
        with pytest.raises(options.SPRMOptionError, match="'sprm_score_prompt' in extra_args takes a JSON boolean") as info:
            options.parse_options({"sprm_score_prompt": bad})
        assert info.value.option == "sprm_score_prompt" and info.value.value == bad
    with pytest.raises(ValueError, match=r'got "false" \(string\)'):
        options.parse_options({"sprm_score_prompt": "false"})


def test_unknown_sprm_option_is_refused_with_a_hint():
    with pytest.raises(options.SPRMOptionError, match=r"unknown SPRM option 'sprm_score_promt' .*did you mean 'sprm_score_prompt'"):
        options.parse_options({"sprm_score_promt": True})
    assert options.parse_options({"score_prompt": "anything"}) == {"sprm_score_prompt": False}  # not ours


# ----- vLLM's output processor and collector, fed scripted engine outputs --------------------------

PROMPT = [5, THINK, 6, 4, STEP, 8]
COMPLETION = [9, 4, STEP, 6, 8, STEP, STEP, 9, 5, STEP, END_THINK, 4, STEP, 6]


def _candidate_logits(ids: list[int]) -> dict[int, float]:
    """What the worker records: a logit wherever SPEC rules 1-2 hold (the region rule comes later)."""
    rng = random.Random(len(ids))
    table = RULE.step_table()
    t = torch.tensor(ids)
    opens = semantics.opens_step(t[:-1], t[1:], table, THINK)
    return {int(p): np.float32(rng.gauss(0, 2)).item() for p in opens.nonzero().squeeze(-1).tolist()}


@pytest.fixture
def frontend_patched():
    from xbai_kernels.vllm import frontend, patches

    applied = patches.apply("frontend")
    yield frontend
    if applied:
        patches.revert("frontend")


def _engine_request(request_id: str, n: int, output_kind, extra_args=None):
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    params = SamplingParams(n=n, max_tokens=100, detokenize=False, output_kind=output_kind, extra_args=extra_args)
    return EngineCoreRequest(
        request_id=request_id, prompt_token_ids=list(PROMPT), mm_features=None, sampling_params=params,
        pooling_params=None, arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None,
        external_req_id=request_id,
    )


def _add(processor, request, queue) -> list[str]:
    """Add a request as AsyncLLM does (n children for n > 1); return the engine's request ids."""
    from vllm.v1.engine.parallel_sampling import ParentRequest

    if request.sampling_params.n == 1:
        processor.add_request(request, None, None, 0, queue)
        return [request.request_id]
    parent = ParentRequest(request)
    ids = []
    for index in range(request.sampling_params.n):
        child_id, child_params = parent.get_child_info(index)
        child = _engine_request(child_id, 1, request.sampling_params.output_kind, request.sampling_params.extra_args)
        child.sampling_params = child_params
        child.external_req_id = request.request_id
        processor.add_request(child, None, parent, index, queue)
        ids.append(child_id)
    return ids


def _batch(records: dict, tokens: dict, finished: set, first: bool):
    """One engine step as the scheduler patch sends it: every request's new token, and the step's
    records (and, the first time, the rule) in the batch's first output."""
    from vllm.v1.engine import EngineCoreOutput, FinishReason

    from xbai_kernels.vllm.engine import PAYLOAD_KEY

    payload = {"records": records}
    if first:
        payload["rule"] = [list(RULE.step_token_ids), THINK, END_THINK]
    batch = [
        EngineCoreOutput(
            request_id=request_id, new_token_ids=[token],
            finish_reason=FinishReason.LENGTH if request_id in finished else None,
        )
        for request_id, token in tokens.items()
    ]
    batch[0].kv_transfer_params = {PAYLOAD_KEY: payload}
    return batch


def _outputs(child_ids: list[str], lengths: list[int]):
    """Engine steps: one token per unfinished child per step; a position's record comes with the
    step that samples its step token (the prompt's with the first step)."""
    logits = _candidate_logits(PROMPT + COMPLETION)
    for step in range(max(lengths)):
        position = len(PROMPT) + step  # of the token sampled now
        recorded = [p for p in logits if (p + 1 <= position if step == 0 else p + 1 == position)]
        live = [(c, n) for c, n in zip(child_ids, lengths) if step < n]
        records = {c: (list(recorded), [logits[p] for p in recorded]) for c, _ in live if recorded}
        tokens = {c: COMPLETION[step] for c, _ in live}
        yield _batch(records, tokens, {c for c, n in live if step == n - 1}, step == 0)


def _expected(length: int, prompt_only: bool = False):
    ids = PROMPT if prompt_only else PROMPT + COMPLETION[:length]
    return _former_score(ids, _candidate_logits(PROMPT + COMPLETION))


@requires_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("n", [1, 4])
def test_deltas_merged_before_the_consumer_reads_keep_their_scores(frontend_patched, n):
    """The consumer of a streamed request reads once, after every delta was queued: vLLM merges them
    into the first (``RequestOutput.add(aggregate=True)``); each choice still carries its scores."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

    processor = OutputProcessor(None, log_stats=False)
    queue = RequestOutputCollector(RequestOutputKind.DELTA, "req")
    request = _engine_request("req", n, RequestOutputKind.DELTA, {"sprm_score_prompt": True})
    child_ids = _add(processor, request, queue)
    lengths = [len(COMPLETION) - 2 * i for i in range(n)]  # children finish at different steps
    for batch in _outputs(child_ids, lengths):
        processor.process_outputs(batch)
    merged = queue.get_nowait()
    assert merged.finished
    assert sorted(c.index for c in merged.outputs) == list(range(n))
    for completion in merged.outputs:
        length = lengths[completion.index]
        assert list(completion.token_ids) == COMPLETION[:length]
        assert completion.finish_reason == "length"
        score, step_scores, positions = _expected(length)
        assert completion.sprm_step_positions == positions
        assert np.allclose(completion.sprm_step_scores, step_scores, rtol=0, atol=2**-22)
        assert math.isclose(completion.sprm_score, score, rel_tol=1e-6)
        assert positions, "the script must score some steps"
        prompt_score, prompt_steps, prompt_positions = _expected(0, prompt_only=True)
        assert completion.sprm_prompt_step_positions == prompt_positions
        assert math.isclose(completion.sprm_prompt_score, prompt_score, rel_tol=1e-6)


@requires_vllm
@pytest.mark.vllm
def test_scores_ride_the_finishing_delta_when_read_every_step(frontend_patched):
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

    processor = OutputProcessor(None, log_stats=False)
    queue = RequestOutputCollector(RequestOutputKind.DELTA, "req")
    child_ids = _add(processor, _engine_request("req", 1, RequestOutputKind.DELTA), queue)
    seen = []
    for batch in _outputs(child_ids, [len(COMPLETION)]):
        processor.process_outputs(batch)
        seen.append(queue.get_nowait().outputs[0])
    assert all(not hasattr(c, "sprm_score") for c in seen[:-1])
    assert seen[-1].sprm_step_positions == _expected(len(COMPLETION))[2]
    assert not hasattr(seen[-1], "sprm_prompt_score")


@requires_vllm
@pytest.mark.vllm
def test_long_completion_is_scanned_while_it_arrives(frontend_patched):
    """The tokens are scanned as they come, on the steps that bring records; finishing scans the rest."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.output_processor import OutputProcessor

    rng = random.Random(4)
    completion = [rng.choice([4, 5, 6, 8, 9, STEP]) for _ in range(3 * SCAN_CHUNK_TOKENS + 17)]
    ids = PROMPT + completion
    logits = _candidate_logits(ids)
    processor = OutputProcessor(None, log_stats=False)
    (child_id,) = _add(processor, _engine_request("long", 1, RequestOutputKind.FINAL_ONLY), None)
    state = processor.request_states[child_id]
    final = None
    last_record_step = gap = 0
    for step, token in enumerate(completion):
        position = len(PROMPT) + step
        recorded = [p for p in logits if (p + 1 <= position if step == 0 else p + 1 == position)]
        records = {child_id: (recorded, [logits[p] for p in recorded])} if recorded else {}
        if recorded:
            gap, last_record_step = max(gap, step - last_record_step), step
        done = step == len(completion) - 1
        if done:
            # Scans run on record steps once a chunk has gathered: at most a chunk plus the longest
            # stretch without a record is left for the finishing step.
            unscanned = len(PROMPT) + step - state.xbai_sprm_scan.length
            assert 0 <= unscanned <= SCAN_CHUNK_TOKENS + max(gap, step - last_record_step)
        batch = _batch(records, {child_id: token}, {child_id} if done else set(), step == 0)
        final = processor.process_outputs(batch).request_outputs or final
    (completion_output,) = final[0].outputs
    score, step_scores, positions = _former_score(ids, logits)
    assert completion_output.sprm_step_positions == positions and len(positions) > 100
    assert np.allclose(completion_output.sprm_step_scores, step_scores, rtol=0, atol=2**-22)
    assert math.isclose(completion_output.sprm_score, score, rel_tol=1e-6)


@requires_vllm
@pytest.mark.vllm
def test_revert_restores_vllm(frontend_patched):
    from vllm.outputs import RequestOutput

    from xbai_kernels.vllm import patches

    patched = RequestOutput.__dict__["add"]
    patches.revert("frontend")
    try:
        assert RequestOutput.__dict__["add"] is not patched
        assert not hasattr(RequestOutput.__dict__["add"], "__wrapped__")
    finally:
        patches.apply("frontend")


@requires_vllm
@pytest.mark.vllm
def test_input_processor_check_refuses_bad_options():
    from vllm import SamplingParams

    from xbai_kernels.vllm import frontend

    calls = []
    # vLLM's own checks stubbed out: the wrapper runs them first, then the options.
    wrapper = frontend.validate_params(lambda self, params, *args, **kwargs: calls.append(params) or "vllm's result")
    assert wrapper(None, SamplingParams(extra_args={"sprm_score_prompt": True}), ()) == "vllm's result"
    with pytest.raises(ValueError, match=r"'sprm_score_prompt' in SamplingParams.extra_args takes a JSON boolean.*\"yes\""):
        wrapper(None, SamplingParams(extra_args={"sprm_score_prompt": "yes"}), ())
    assert len(calls) == 2
