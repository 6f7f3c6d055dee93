"""The oracle for the vLLM tests: a HuggingFace forward over the final token ids, then SPEC's rule.

Tolerance: an fp32 engine must match the fp32 reference to 1e-4 (this checks the plumbing: a logit
read at a wrong position or from a wrong request is off by far more). A bf16 engine follows
DESIGN.md's rule: its largest error against the fp32 reference may be at most twice plain
PyTorch's in bf16 (the same HF forward run in bf16) plus 2^-8. The tiny model's head is calibrated
to spread step scores over (0, 1), which amplifies bf16 rounding of h: bf16 scores differ from fp32
ones by up to ~0.2, for HF and vLLM alike, too much to check positions' logits one by one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xbai_kernels import SPRMHead, StepRule, score_trajectories

SLACK = 2.0**-8
FP32_TOLERANCE = 1e-4


@dataclass
class Reference:
    positions: list[int]
    step_scores: list[float]
    score: float


@functools.lru_cache(maxsize=8)
def _load(model_dir: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # SPEC: the scoring server loads the head in the model's dtype.
    head = SPRMHead.from_pretrained(model_dir, dtype=dtype).eval()
    return model, StepRule.from_tokenizer(tokenizer), head


@torch.no_grad()
def reference_scores(model_dir, trajectories: list[list[int]], dtype: torch.dtype = torch.float32) -> list[Reference]:
    """Score each token-id trajectory (prompt + completion) with ``hidden_states[-2]`` of an HF forward."""
    model, rule, head = _load(str(model_dir), dtype)
    results = []
    for ids in trajectories:
        input_ids = torch.tensor([ids], dtype=torch.int64)
        hidden = model(input_ids, output_hidden_states=True).hidden_states[-2][0]
        scores = score_trajectories(hidden, input_ids[0], head, rule)[0]
        results.append(Reference(scores.positions.tolist(), scores.step_scores.tolist(), scores.score))
    return results


def _max_error(got: list[float], want: list[float]) -> float:
    if not want:
        return 0.0
    return float((torch.tensor(got, dtype=torch.float64) - torch.tensor(want, dtype=torch.float64)).abs().max())


def check_scores(model_dir, ids: list[int], positions, step_scores, score) -> int:
    """Assert one trajectory of an fp32 engine matches the fp32 reference to 1e-4; return its step count."""
    (exact,) = reference_scores(model_dir, [ids])
    assert list(positions) == exact.positions, (ids, list(positions), exact.positions)
    assert _max_error(step_scores, exact.step_scores) <= FP32_TOLERANCE, (step_scores, exact.step_scores)
    assert abs(score - exact.score) <= FP32_TOLERANCE, (score, exact.score)
    return len(exact.positions)


def compare(model_dir, prompt_ids_and_outputs, engine_dtype=torch.float32):
    """Check every (prompt token ids, CompletionOutput) pair; return (#trajectories, #steps).

    Positions must be identical, trajectory by trajectory. Scores: an fp32 engine must match to
    1e-4; a bf16 engine's largest error over the whole set may be at most twice that of the HF
    forward in bf16 over the same set, plus 2^-8.
    """
    pairs = list(prompt_ids_and_outputs)
    for _, output in pairs:
        assert getattr(output, "sprm_error", None) is None, output.sprm_error
    trajectories = [list(prompt) + list(output.token_ids) for prompt, output in pairs]
    exact = reference_scores(model_dir, trajectories)
    for ids, (_, output), expected in zip(trajectories, pairs, exact):
        assert output.sprm_step_positions == expected.positions, (ids, output.sprm_step_positions, expected.positions)
    engine_step = max(_max_error(o.sprm_step_scores, e.step_scores) for (_, o), e in zip(pairs, exact))
    engine_score = max(abs(o.sprm_score - e.score) for (_, o), e in zip(pairs, exact))
    if engine_dtype == torch.float32:
        step_tolerance = score_tolerance = FP32_TOLERANCE
    else:
        same_dtype = reference_scores(model_dir, trajectories, engine_dtype)
        step_tolerance = 2 * max(_max_error(t.step_scores, e.step_scores) for t, e in zip(same_dtype, exact)) + SLACK
        score_tolerance = 2 * max(abs(t.score - e.score) for t, e in zip(same_dtype, exact)) + SLACK
    assert engine_step <= step_tolerance, f"largest step-score error {engine_step} > {step_tolerance}"
    assert engine_score <= score_tolerance, f"largest trajectory-score error {engine_score} > {score_tolerance}"
    return len(pairs), sum(len(e.positions) for e in exact)
