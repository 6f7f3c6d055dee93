"""Best-of-N in one engine: N candidates per prompt from one ``generate`` call, scored while they were decoded.

The released pipeline generated with vLLM and then sent every candidate to a second server that
ran the backbone again; here the scores come back with the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

from .pruning import OPTION as PRUNE_OPTION

# SPEC, test-time scaling: the released modes.
MODES = {"low": 2, "medium": 8, "high": 32}


@dataclass
class Candidate:
    """One sampled trajectory: its text, completion token ids and SPRM scores (see ``frontend``)."""

    index: int
    text: str
    token_ids: list[int]
    score: float | None
    step_scores: list[float]
    step_positions: list[int]
    finish_reason: str | None
    pruned: bool = False  # a pruning policy stopped it (``pruning``); it never wins the pick
    pruned_at_step: int | None = None


@dataclass
class BestOfN:
    """One prompt's result: ``best`` (highest trajectory score) and every candidate in sampling order."""

    prompt: str | None
    prompt_token_ids: list[int]
    best: Candidate
    candidates: list[Candidate]


def resolve_n(mode: str | None, n: int | None) -> int:
    if (mode is None) == (n is None):
        raise ValueError(f"best_of_n: give exactly one of mode ({', '.join(MODES)}) or n, got mode={mode!r}, n={n!r}")
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"best_of_n: mode must be one of {', '.join(MODES)}, got {mode!r}")
        return MODES[mode]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of_n: n must be a positive int, got {n!r}")
    return n


def pick_best(candidates: list[Candidate]) -> Candidate:
    """Highest score wins; a pruned candidate never wins over one that ran to its end, nor one without
    a score over one with a score; ties keep order."""
    return max(
        candidates,
        key=lambda c: (not c.pruned, c.score is not None, c.score if c.score is not None else 0.0, -c.index),
    )


def _candidate(completion) -> Candidate:
    if not hasattr(completion, "sprm_score"):
        raise RuntimeError(
            "best_of_n: the engine returned no SPRM scores. Is the xbai_kernels vLLM plugin installed "
            "(pip install xbai-kernels), does the model directory hold sprm_head.safetensors or "
            "score_module.pt (or XBAI_SPRM_HEAD point at one), and is XBAI_SPRM not 0?"
        )
    return Candidate(
        index=completion.index,
        text=completion.text,
        token_ids=list(completion.token_ids),
        score=completion.sprm_score,
        step_scores=list(completion.sprm_step_scores),
        step_positions=list(completion.sprm_step_positions),
        finish_reason=completion.finish_reason,
        pruned=bool(getattr(completion, "sprm_pruned", False)),
        pruned_at_step=getattr(completion, "sprm_pruned_at_step", None),
    )


def best_of_n(
    llm, prompts, mode: str | None = None, n: int | None = None, prune=None, use_tqdm: bool = False, **sampling
):
    """Sample N candidates per prompt in one ``llm.generate`` call; return one ``BestOfN`` per prompt.

    ``llm`` is a ``vllm.LLM`` serving a model with an SPRM head; ``prompts`` is one prompt or a
    list (strings, or anything ``LLM.generate`` accepts); ``mode`` is low / medium / high (N = 2 /
    8 / 32) or ``n`` is given; ``prune`` is a pruning policy (``pruning``: e.g. ``{"policy":
    "relative", "steps": [4, 8], "keep": [0.5, 0.25]}``) that stops losing candidates while they
    decode; ``sampling`` goes to ``SamplingParams`` (temperature, top_p, max_tokens, stop, ...).
    """
    from vllm import SamplingParams

    if "n" in sampling:
        raise ValueError("best_of_n: pass n as its own argument, not inside the sampling options")
    count = resolve_n(mode, n)
    if prune is not None:
        extra = dict(sampling.pop("extra_args", None) or {})
        extra[PRUNE_OPTION] = prune
        sampling["extra_args"] = extra
    single = isinstance(prompts, (str, dict))
    batch = [prompts] if single else list(prompts)
    outputs = llm.generate(batch, SamplingParams(n=count, **sampling), use_tqdm=use_tqdm)
    results = []
    for output in outputs:
        candidates = [_candidate(c) for c in sorted(output.outputs, key=lambda c: c.index)]
        results.append(BestOfN(output.prompt, list(output.prompt_token_ids), pick_best(candidates), candidates))
    return results
