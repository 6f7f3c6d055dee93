"""Scored requests share cached prompt blocks like any other request (issue: n samples of one prompt,
Best-of-N's workload): the prompt is computed once for all n samples, plus at most a block each, a
repeat is served from the cache, and the scores still equal a HuggingFace re-forward, the prompt's
steps inside its thinking region included."""

from __future__ import annotations

import pytest

from vllm_helpers import ENGINE_DEFAULTS, in_process_llm, requires_vllm, shutdown
from vllm_reference import check_scores, compare

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

BLOCK = ENGINE_DEFAULTS["block_size"]
N = 8
NEW_TOKENS = 16
WORDS = "the answer is we compute first then so let check step value sum of two three four five".split()


def _long_prompt(salt: str) -> str:
    body = ".\n\n".join(" ".join(WORDS[(k + j) % len(WORDS)] for j in range(5)) for k in range(250))
    return f"<think>\n{salt} {body}.\n\n"


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    # In process: the test counts the tokens the scheduler schedules.
    llm = in_process_llm(tiny_qwen3, enforce_eager=True, enable_prefix_caching=True, max_num_batched_tokens=2048,
                         max_num_seqs=16, **{**ENGINE_DEFAULTS, "dtype": "float32", "max_model_len": 2048})
    yield llm
    shutdown(llm)


def _generate_counting(llm, prompt: str):
    """The n samples of ``prompt`` and the number of tokens the engine scheduled for them."""
    from vllm import SamplingParams

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    original, scheduled = scheduler.schedule, [0]

    def counting(*args, **kwargs):
        output = original(*args, **kwargs)
        scheduled[0] += output.total_num_scheduled_tokens
        return output

    scheduler.schedule = counting
    try:
        params = SamplingParams(n=N, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args={"sprm_score_prompt": True})
        (output,) = llm.generate([prompt], params, use_tqdm=False)
    finally:
        del scheduler.schedule
    return output, scheduled[0]


def test_n_samples_compute_the_prompt_once_and_a_repeat_reads_the_cache(engine, tiny_qwen3):
    prompt = _long_prompt("first")
    first, first_tokens = _generate_counting(engine, prompt)
    prompt_length = len(first.prompt_token_ids)
    assert prompt_length > 1400
    decode = N * NEW_TOKENS
    assert first_tokens - decode <= prompt_length + N * BLOCK, (first_tokens, prompt_length)
    again, again_tokens = _generate_counting(engine, prompt)
    assert again.num_cached_tokens > 0
    assert again_tokens - decode <= N * BLOCK, again_tokens
    for output in (first, again):
        trajectories, _ = compare(tiny_qwen3, [(output.prompt_token_ids, c) for c in output.outputs])
        assert trajectories == N
        for completion in output.outputs:
            steps = check_scores(tiny_qwen3, list(output.prompt_token_ids), completion.sprm_prompt_step_positions,
                                 completion.sprm_prompt_step_scores, completion.sprm_prompt_score)
            assert steps >= 200  # the prompt's steps lie in its thinking region
