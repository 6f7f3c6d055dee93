"""The front end without an engine: vLLM's real OutputProcessor and RequestOutputCollector fed scripted
engine outputs (the merge path of streamed requests, stop-string chunks), the request options, and
the finish-time scoring against SPEC's rule (``scoring.step_mask``) and the former whole-sequence
implementation.
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
from xbai_kernels.vllm.logit_store import CacheSlotLogits, FinishedLogits, finished_logits
from xbai_kernels.vllm.results import region_positions, score_steps

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


# ----- the engine's step candidates and the front end's finish-time scoring (no vLLM needed) ----


def _adversarial(rng: random.Random, length: int) -> list[int]:
    # Dense steps, runs of step tokens, markers that occur 0, 1 or several times, a step token right
    # after <think>, ids past the step table (500) and id 0.
    vocabulary = [0, THINK, END_THINK, STEP, STEP, 7, 4, 5, 6, 500, 8]
    return [rng.choice(vocabulary) for _ in range(length)]


def _positions(finished: FinishedLogits, length: int) -> list[int]:
    return region_positions(finished, length)[0].tolist()


def test_candidates_and_region_match_spec_rule_on_random_trajectories_and_cuts():
    rng = random.Random(0)
    for _ in range(3000):
        ids = _adversarial(rng, rng.randrange(0, 70))
        finished = finished_logits(ids, RULE, np.zeros(max(len(ids) - 1, 0), dtype=np.float32))
        # The whole trajectory, and the trajectory a stop string would leave (any prefix).
        for length in {len(ids), rng.randrange(0, len(ids) + 1)}:
            assert _positions(finished, length) == _spec_positions(ids[:length]), (ids, length)


def test_stop_string_chunks_join_into_the_whole_trajectory():
    """The engine's chunks of a stop-string request (``first_position``: the tokens from there on,
    markers after it) join into what the whole trajectory gives, at every cut."""
    rng = random.Random(1)
    block_size = 4
    for _ in range(500):
        ids = _adversarial(rng, rng.randrange(2, 90))
        store = CacheSlotLogits(num_blocks=32, block_size=block_size, rule=RULE)
        store.values[:] = rng.random()
        block_ids = rng.sample(range(32), (len(ids) + block_size - 1) // block_size)
        ends = sorted(rng.sample(range(1, len(ids)), rng.randrange(1, min(5, len(ids) - 1) + 1)))
        parts, delivered = [], 0
        for end in ends:
            parts.append(store.finished_logits(ids[delivered : end + 1], block_ids, first_position=delivered))
            delivered = end
        joined, whole = FinishedLogits.join(parts), store.finished_logits(ids[: ends[-1] + 1], block_ids)
        assert joined.length == whole.length == ends[-1] + 1
        for name in ("candidates", "logits", "think_starts", "think_ends"):
            assert np.array_equal(getattr(joined, name), getattr(whole, name)), name


def test_with_a_large_step_set():
    # SPEC's Chinese set holds thousands of ids: membership by table, ids past it are no steps.
    rule = StepRule(tuple(range(1000, 4000, 3)), 10, 11)
    rng = random.Random(2)
    ids = [rng.choice([10, 11, 5, 1000, 1003, 3997, 3998, 5000, 2500]) for _ in range(4000)]
    finished = finished_logits(ids, rule, np.zeros(len(ids) - 1, dtype=np.float32))
    assert _positions(finished, len(ids)) == _spec_positions(ids, rule)


def test_scores_equal_the_former_torch_implementation():
    rng = random.Random(3)
    checked = 0
    for _ in range(500):
        ids = _adversarial(rng, rng.randrange(0, 300))
        logits = np.array([rng.gauss(0.0, 3.0) for _ in range(len(ids))], dtype=np.float32)
        by_position = {p: float(v) for p, v in enumerate(logits)}
        want_score, want_steps, want_positions = _former_score(ids, by_position)
        got = score_steps(*region_positions(finished_logits(ids, RULE, logits), len(ids)))
        assert got.error is None
        assert got.step_positions == want_positions
        # float32 step scores: torch's float32 sigmoid is off by up to a few ulp (2^-24 near 0.5).
        assert np.allclose(got.step_scores, want_steps, rtol=0, atol=2**-22)
        assert math.isclose(got.score, want_score, rel_tol=1e-6, abs_tol=1e-12)
        checked += len(want_positions)
    assert checked > 1000


def test_missing_logit_is_an_error_not_a_wrong_score():
    ids = [4, THINK, 5, STEP, 6, STEP, END_THINK]
    logits = np.full(len(ids) - 1, np.nan, dtype=np.float32)
    logits[2] = 0.5  # the logit of position 4 was never recorded
    result = score_steps(*region_positions(finished_logits(ids, RULE, logits), len(ids)))
    assert result.score is None and result.step_positions == [2, 4]
    assert "1 scored position(s) (first: 4)" in result.error


def test_no_step_scores_zero():
    assert score_steps(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)).score == 0.0
    assert score_steps(*region_positions(finished_logits([], RULE, np.zeros(0)), 0)).score == 0.0


# ----- request options (no vLLM needed) ----------------------------------------------------------


def test_options_take_booleans_only():
    assert options.parse_options(None) == {"sprm_score_prompt": False, "sprm_prune": None}
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
    assert options.parse_options({"score_prompt": "anything"}) == {"sprm_score_prompt": False, "sprm_prune": None}  # not ours


def test_prune_option_is_checked_and_normalized():
    values = options.parse_options({"sprm_prune": '{"policy": "absolute", "threshold": 0.4}'})
    assert values["sprm_prune"] == {"policy": "absolute", "threshold": 0.4, "min_steps": 4, "window": None, "min_keep": 1}
    with pytest.raises(options.SPRMOptionError, match=r"'sprm_prune' in extra_args needs steps in increasing order") as info:
        options.parse_options({"sprm_prune": {"policy": "relative", "steps": [8, 4], "keep": [0.5, 0.25]}})
    assert info.value.option == "sprm_prune"


# ----- vLLM's output processor and collector, fed scripted engine outputs --------------------------

PROMPT = [5, THINK, 6, 4, STEP, 8]
COMPLETION = [9, 4, STEP, 6, 8, STEP, STEP, 9, 5, STEP, END_THINK, 4, STEP, 6]


def _candidate_logits(ids: list[int]) -> np.ndarray:
    """What the engine keeps, by position: a logit wherever SPEC rules 1-2 hold (the region rule
    comes later), NaN elsewhere. float32 [len(ids) - 1]."""
    rng = random.Random(len(ids))
    t = torch.tensor(ids)
    opens = semantics.opens_step(t[:-1], t[1:], RULE.step_table(), THINK)
    logits = np.full(len(ids) - 1, np.nan, dtype=np.float32)
    for p in opens.nonzero().squeeze(-1).tolist():
        logits[p] = rng.gauss(0, 2)
    return logits


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


def _batch(tokens: dict, finished: dict, stopped: dict, chunks: dict):
    """One engine step as the scheduler patch sends it: every request's new token (``finished``: the
    finish reason of those that end), and the stopped requests' logits and stop-string chunks in
    the batch's first output."""
    from vllm.v1.engine import EngineCoreOutput

    from xbai_kernels.vllm.engine import PAYLOAD_KEY

    batch = [
        EngineCoreOutput(request_id=request_id, new_token_ids=[token], finish_reason=finished.get(request_id))
        for request_id, token in tokens.items()
    ]
    if stopped or chunks:
        payload = {"stopped": {r: f.to_payload() for r, f in stopped.items()},
                   "chunks": {r: c.to_payload() for r, c in chunks.items()}}
        batch[0].kv_transfer_params = {PAYLOAD_KEY: payload}
    return batch


LOGITS = _candidate_logits(PROMPT + COMPLETION)


def _outputs(child_ids: list[str], lengths: list[int]):
    """Engine steps: one token per unfinished child per step; a child that stops (at its length)
    brings its logits, found in its token ids."""
    from vllm.v1.engine import FinishReason

    for step in range(max(lengths)):
        live = [(c, n) for c, n in zip(child_ids, lengths) if step < n]
        ending = {c: n for c, n in live if step == n - 1}
        stopped = {c: finished_logits(PROMPT + COMPLETION[:n], RULE, LOGITS) for c, n in ending.items()}
        yield _batch({c: COMPLETION[step] for c, _ in live}, dict.fromkeys(ending, FinishReason.LENGTH), stopped, {})


def _expected(length: int, prompt_only: bool = False):
    ids = PROMPT if prompt_only else PROMPT + COMPLETION[:length]
    return _former_score(ids, {p: float(v) for p, v in enumerate(LOGITS) if not np.isnan(v)})


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


def _stop_string_run(lose_last_chunk: bool):
    """A request the front end ends by a stop string after the last token (the engine never saw it
    stop): its logits come as chunks, one per step, from the first decode step on."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine import FinishReason
    from vllm.v1.engine.output_processor import OutputProcessor

    processor = OutputProcessor(None, log_stats=False)
    (child_id,) = _add(processor, _engine_request("stop", 1, RequestOutputKind.FINAL_ONLY), None)

    ids = PROMPT + COMPLETION
    # The scheduler's store, the request's positions in blocks 0, 1, ... in order.
    store = CacheSlotLogits(num_blocks=len(ids), block_size=1, rule=RULE)
    store.values[: LOGITS.size] = LOGITS
    block_ids = list(range(len(ids)))
    final = None
    delivered = 0
    for step, token in enumerate(COMPLETION):
        end = len(PROMPT) + step  # the engine has tokens up to ``end`` once this step's is appended
        chunk = store.finished_logits(ids[delivered : end + 1], block_ids, first_position=delivered)
        delivered = end
        done = step == len(COMPLETION) - 1
        chunks = {} if done and lose_last_chunk else {child_id: chunk}
        batch = _batch({child_id: token}, {child_id: FinishReason.STOP} if done else {}, {}, chunks)
        final = processor.process_outputs(batch).request_outputs or final
    (completion_output,) = final[0].outputs
    return completion_output


@requires_vllm
@pytest.mark.vllm
def test_stop_string_finish_scores_from_the_chunks(frontend_patched):
    completion_output = _stop_string_run(lose_last_chunk=False)
    score, step_scores, positions = _expected(len(COMPLETION))
    assert completion_output.sprm_step_positions == positions and positions
    assert np.allclose(completion_output.sprm_step_scores, step_scores, rtol=0, atol=2**-22)
    assert math.isclose(completion_output.sprm_score, score, rel_tol=1e-6)


@requires_vllm
@pytest.mark.vllm
def test_chunks_that_fall_behind_are_an_error_not_a_wrong_score(frontend_patched):
    completion_output = _stop_string_run(lose_last_chunk=True)
    final_length = len(PROMPT + COMPLETION)
    assert completion_output.sprm_score is None
    assert completion_output.sprm_error == f"the engine sent step logits for {final_length - 1} of the {final_length} tokens"


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
