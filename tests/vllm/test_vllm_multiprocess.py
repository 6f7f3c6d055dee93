"""LLM.generate in vLLM's default mode (engine core in its own process), with the model compiled
(``enforce_eager=False``), on the Qwen2 tiny model whose head is the released ``score_module.pt``,
in bf16 as users run it (scores within bf16 tolerance, see vllm_reference)."""

from __future__ import annotations

import pytest
import torch

from vllm_helpers import ENGINE_DEFAULTS, requires_vllm, shutdown
from vllm_reference import compare

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

WORDS = "we compute the sum of two three then check value so answer".split()


@pytest.fixture(scope="module")
def engine(tiny_qwen2_released_head):
    from vllm import LLM

    llm = LLM(str(tiny_qwen2_released_head), enforce_eager=False, **ENGINE_DEFAULTS)
    yield llm
    shutdown(llm)


def test_engine_runs_in_another_process_and_compiled(engine):
    assert type(engine.llm_engine.engine_core).__name__ == "SyncMPClient"
    assert engine.llm_engine.vllm_config.compilation_config.mode != 0  # CompilationMode.NONE


def test_scores_match_reference(engine, tiny_qwen2_released_head):
    from vllm import SamplingParams

    prompts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(5)) for i in range(16)]
    outputs = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=96), use_tqdm=False)
    pairs = [(o.prompt_token_ids, c) for o in outputs for c in o.outputs]
    trajectories, steps = compare(tiny_qwen2_released_head, pairs, engine_dtype=torch.bfloat16)
    assert trajectories == 32 and steps >= 32


def test_n8(engine, tiny_qwen2_released_head):
    from vllm import SamplingParams

    outputs = engine.generate(["<think>\nwe compute.\n\n"] * 4, SamplingParams(n=8, temperature=1.0, max_tokens=64), use_tqdm=False)
    pairs = [(o.prompt_token_ids, c) for o in outputs for c in o.outputs]
    trajectories, steps = compare(tiny_qwen2_released_head, pairs, engine_dtype=torch.bfloat16)
    assert trajectories == 32 and steps >= 32


def test_pruning_across_the_process_boundary(engine, tiny_qwen2_released_head):
    """The siblings' group travels in extra_args and the decisions in the step payload (msgpack)."""
    from vllm import SamplingParams

    from xbai_kernels.vllm import pruning

    policy = {"policy": "relative", "steps": [1, 2], "keep": [0.5, 0.25], "min_keep": 2}
    params = SamplingParams(n=8, temperature=1.0, max_tokens=64, extra_args={"sprm_prune": policy})
    outputs = engine.generate(["<think>\nwe compute.\n\n"] * 2, params, use_tqdm=False)
    completions = [c for o in outputs for c in o.outputs]
    assert any(c.sprm_pruned for c in completions)
    for output in outputs:
        logs = {c.index: c.sprm_prune_decisions for c in output.outputs}
        assert pruning.replay(pruning.parse_policy(policy), logs) == logs
    pairs = [(o.prompt_token_ids, c) for o in outputs for c in o.outputs]
    assert compare(tiny_qwen2_released_head, pairs, engine_dtype=torch.bfloat16)[0] == 16
