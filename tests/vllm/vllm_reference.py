"""The oracle for the vLLM tests: a HuggingFace forward over the final token ids, then SPEC's rule."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xbai_kernels import SPRMHead, StepRule, score_trajectories


@dataclass
class Reference:
    positions: list[int]
    step_scores: list[float]
    score: float


@functools.lru_cache(maxsize=4)
def _load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head = SPRMHead.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, StepRule.from_tokenizer(tokenizer), head


@torch.no_grad()
def reference_scores(model_dir: str, trajectories: list[list[int]]) -> list[Reference]:
    """Score each token-id trajectory (prompt + completion) with ``hidden_states[-2]`` of an fp32 HF forward."""
    model, rule, head = _load(str(model_dir))
    results = []
    for ids in trajectories:
        input_ids = torch.tensor([ids], dtype=torch.int64)
        hidden = model(input_ids, output_hidden_states=True).hidden_states[-2][0]
        scores = score_trajectories(hidden, input_ids[0], head, rule)[0]
        results.append(Reference(scores.positions.tolist(), scores.step_scores.tolist(), scores.score))
    return results


def compare(model_dir: str, prompt_ids_and_outputs, atol: float):
    """Check every (prompt token ids, CompletionOutput) pair against the reference; return (#trajectories, #steps, max error)."""
    pairs = list(prompt_ids_and_outputs)
    trajectories = [list(prompt) + list(output.token_ids) for prompt, output in pairs]
    references = reference_scores(model_dir, trajectories)
    steps, worst = 0, 0.0
    for (prompt, output), expected, ids in zip(pairs, references, trajectories):
        assert getattr(output, "sprm_error", None) is None, output.sprm_error
        assert output.sprm_step_positions == expected.positions, (ids, output.sprm_step_positions, expected.positions)
        got = torch.tensor(output.sprm_step_scores, dtype=torch.float64)
        want = torch.tensor(expected.step_scores, dtype=torch.float64)
        if want.numel():
            worst = max(worst, float((got - want).abs().max()))
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
        assert abs(output.sprm_score - expected.score) <= atol, (output.sprm_score, expected.score)
        steps += len(expected.positions)
    return len(pairs), steps, worst
