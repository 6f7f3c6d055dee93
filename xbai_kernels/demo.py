"""The demo: Best-of-N on a tiny local model, every trajectory scored step by step with the SPRM head.

With vLLM installed, the candidates are sampled and scored in one engine pass
(``xbai_kernels.vllm.best_of_n``: the step scores come from the hidden states vLLM already had), and
on the tiny model the demo cross-checks them against a HuggingFace forward over the same token ids.
Without vLLM (or with ``XBAI_DEMO_ENGINE=hf``) it samples with HuggingFace ``generate`` and scores
the finished trajectories the way the released pipeline does: one more forward over each whole
text to read ``h``, the path the package exists to remove from serving.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .head import SAFETENSORS_FILENAME, SPRMHead, check_model_directory
from . import semantics
from .rule import StepRule
from .scoring import TrajectoryScores, score_trajectories

DEFAULT_PROMPT = "What is the sum of two three and four? Think step by step."


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xbai-kernels``, else ``~/.cache/xbai-kernels``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xbai-kernels"


def ensure_tiny_model(arch: str = "qwen3", seed: int = 0) -> Path:
    """The tiny model's directory in the cache, built on first use (a few seconds, no network)."""
    from .tiny import make_tiny_model

    target = cache_dir() / f"tiny-{arch}-seed{seed}"
    if (target / "config.json").is_file() and (target / SAFETENSORS_FILENAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a demo interrupted mid-build leaves no half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make_tiny_model(staging, arch=arch, seed=seed)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, head, rule) of a model directory that holds an SPRM head next to the HF files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    head = SPRMHead.from_pretrained(model_dir, hidden_size=model.config.hidden_size, device=device).eval()
    return model, tokenizer, head, StepRule.from_tokenizer(tokenizer)


@torch.no_grad()
def hidden_states_for_scoring(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``h`` of one trajectory by a full forward: HF ``hidden_states[-2]``. input_ids int [L] -> [L, d].

    ``h`` is the input of the last decoder layer, i.e. ``output_hidden_states[-2]``.
    """
    out = model(input_ids=input_ids[None].to(model.device), output_hidden_states=True)
    return out.hidden_states[-2][0]


def score_sequences_hf(model, head: SPRMHead, rule: StepRule, sequences: list[torch.Tensor]) -> TrajectoryScores:
    """Score finished trajectories (each int64 [L_s], prompt + completion) with one forward each, packed."""
    hidden = torch.cat([hidden_states_for_scoring(model, ids) for ids in sequences])
    ids = torch.cat(sequences).to(hidden.device)
    lengths = torch.tensor([0] + [s.numel() for s in sequences])
    cu_seqlens = lengths.cumsum(0).to(torch.int32).to(hidden.device)
    return score_trajectories(hidden.to(head[0].weight.dtype), ids, head, rule, cu_seqlens)


@torch.no_grad()
def sample_trajectories(
    model, tokenizer, prompt: str, num_samples: int, max_new_tokens: int, seed: int
) -> list[torch.Tensor]:
    """N sampled trajectories (prompt + completion ids, int64 [L_s]), cut at the first end-of-sequence."""
    prompt_ids = _chat_prompt_ids(tokenizer, prompt).to(model.device)
    torch.manual_seed(seed)
    # The released pipeline sampled at temperature 0.6-0.8 with top_p 0.95.
    generated = model.generate(
        prompt_ids,
        do_sample=True,
        temperature=0.7,
        top_p=0.95,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    trajectories = []
    prompt_length = prompt_ids.shape[1]
    for row in generated.cpu():
        completion = row[prompt_length:]
        ends = (completion == tokenizer.eos_token_id).nonzero()
        if ends.numel():
            completion = completion[: int(ends[0])]
        trajectories.append(torch.cat([row[:prompt_length], completion]))
    return trajectories


def _chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """int64 [1, P]: the prompt as one user turn of the tokenizer's chat template, ready for generation."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


@dataclass
class DemoResult:
    texts: list[str]
    scores: TrajectoryScores
    best: int


DEMO_ENGINES = ("auto", "vllm", "hf")


def demo_engine(engine: str | None = None) -> str:
    """``vllm`` or ``hf``: the argument, else ``XBAI_DEMO_ENGINE``, else vLLM when it is importable."""
    choice = (engine or os.environ.get("XBAI_DEMO_ENGINE") or "auto").strip().lower()
    if choice not in DEMO_ENGINES:
        raise ValueError(f"demo engine must be one of {', '.join(DEMO_ENGINES)}, got {choice!r}")
    if choice == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return choice


def run_demo(
    model_dir: str | Path | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 96,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
    engine: str | None = None,
) -> DemoResult:
    """Sample ``num_samples`` trajectories, score every step, print them and the Best-of-N pick.

    ``engine``: ``"vllm"`` (one engine pass, see ``_run_demo_vllm``), ``"hf"`` (generate, then a
    second forward to score) or ``"auto"``/None (``XBAI_DEMO_ENGINE``, else vLLM when installed).
    A ``model_dir`` that is missing, has no head, or a head of another size raises ``CheckpointError``
    before any model loads.
    """
    if model_dir is not None:
        check_model_directory(model_dir)
    if demo_engine(engine) == "vllm":
        return _run_demo_vllm_in_process(model_dir, num_samples, max_new_tokens, seed, prompt, echo)
    return _run_demo_hf(model_dir, num_samples, max_new_tokens, seed, prompt, device, echo)


def _run_demo_hf(model_dir, num_samples, max_new_tokens, seed, prompt, device, echo) -> DemoResult:
    """The HuggingFace path: ``generate``, then one forward per trajectory to score it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if model_dir is None:
        model_dir = ensure_tiny_model()
        echo(f"model: tiny Qwen3 with random weights (built in {model_dir})")
    else:
        echo(f"model: {model_dir}")
    model, tokenizer, head, rule = load_model(model_dir, device)
    trajectories = sample_trajectories(model, tokenizer, prompt, num_samples, max_new_tokens, seed)
    scores = score_sequences_hf(model, head, rule, trajectories)

    echo(f"prompt: {prompt!r}; {num_samples} samples, up to {max_new_tokens} new tokens each\n")
    texts = [tokenizer.decode(ids) for ids in trajectories]
    echo(_backend_line())
    prompt_length = _chat_prompt_ids(tokenizer, prompt).shape[1]
    best = _report(scores, trajectories, prompt_length, rule, num_samples, echo)
    echo("  " + _snippet(tokenizer.decode(trajectories[best][-48:])))
    return DemoResult(texts, scores, best)


def _report(
    scores: TrajectoryScores, sequences: list[torch.Tensor], prompt_length: int, rule: StepRule, num_samples: int, echo
) -> int:
    """Print every trajectory's step scores, how its step tokens were counted, and the pick; return the pick."""
    echo(
        "Each trajectory: its tokens (prompt + completion), the step tokens in it and how many scored, then\n"
        "its score, the geometric mean of the step scores. A step token scores the position before it, and\n"
        "only inside <think>...</think>, and not right after another step token or <think>.\n"
    )
    for s, ids in enumerate(sequences):
        one = scores[s]
        step_scores = " ".join(f"{p:.4f}" for p in one.step_scores.tolist()) or "(no step)"
        echo(
            f"trajectory {s}: {ids.numel()} tokens ({prompt_length} prompt + {ids.numel() - prompt_length} "
            f"generated), {_step_count(ids, rule, one.positions.numel())}, score {one.score:.4f}"
        )
        echo(f"  step scores: {step_scores}")
    best = int(torch.argmax(scores.scores)) if len(scores) else 0
    echo(f"\nBest-of-{num_samples} pick: trajectory {best} (score {float(scores.scores[best]):.4f})")
    return best


def _step_count(ids: torch.Tensor, rule: StepRule, scored: int) -> str:
    """'k step tokens, n scored' and, when they differ, why the others were not (the rules of semantics)."""
    ids = ids.long()
    table = rule.step_table()
    step_tokens = int(semantics.is_step_token(ids, table).sum())
    following = torch.cat([ids[1:], torch.tensor([semantics.NO_TOKEN])])
    candidates = int(semantics.opens_step(ids, following, table, rule.think_start_id).sum())
    reasons = []
    if step_tokens > candidates:
        reasons.append(f"{step_tokens - candidates} follow a step token or <think>")
    if candidates > scored:
        reasons.append(f"{candidates - scored} outside the thinking region")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return f"{step_tokens} step tokens, {scored} scored{why}"


def _backend_line() -> str:
    if torch.cuda.is_available():
        return "backend: chosen per op on the GPU (Triton or CUDA; XBAI_KERNELS_BACKEND forces one)"
    return "backend: reference (plain PyTorch): on a CPU only the reference path runs; the kernels need a GPU"


def _as_trajectory_scores(candidates) -> TrajectoryScores:
    """The vLLM candidates' scores in the packed layout ``score_trajectories`` returns."""
    counts = torch.tensor([len(c.step_positions) for c in candidates], dtype=torch.int64)
    step_scores = torch.tensor([p for c in candidates for p in c.step_scores], dtype=torch.float32)
    cu_steps = torch.zeros(len(candidates) + 1, dtype=torch.int64)
    cu_steps[1:] = counts.cumsum(0)
    return TrajectoryScores(
        positions=torch.tensor([p for c in candidates for p in c.step_positions], dtype=torch.int64),
        sequence_index=torch.repeat_interleave(torch.arange(len(candidates)), counts),
        logits=torch.logit(step_scores.double()).float(),
        step_scores=step_scores,
        cu_steps=cu_steps,
        scores=torch.tensor([c.score or 0.0 for c in candidates], dtype=torch.float32),
    )


def _run_demo_vllm_in_process(model_dir, num_samples, max_new_tokens, seed, prompt, echo) -> DemoResult:
    """The vLLM path: N candidates sampled and step-scored in one ``generate`` (``best_of_n``).

    On the tiny model the scores are cross-checked against a HuggingFace forward over the same
    token ids (the released pipeline's second pass), and the largest difference is printed.
    """
    # Quiet and in-process unless the user asked otherwise: the demo prints its own results.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        return _run_demo_vllm(model_dir, num_samples, max_new_tokens, seed, prompt, echo)
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)


def _run_demo_vllm(model_dir, num_samples, max_new_tokens, seed, prompt, echo) -> DemoResult:
    from vllm import LLM

    from .vllm import best_of_n

    tiny = model_dir is None
    if tiny:
        model_dir = ensure_tiny_model()
        echo(f"model: tiny Qwen3 with random weights (built in {model_dir}), served by vLLM")
        options = dict(engine_options(), dtype="float32", max_model_len=1024, enforce_eager=True)
    else:
        echo(f"model: {model_dir}, served by vLLM")
        options = engine_options()
    llm = LLM(str(model_dir), seed=seed, **options)
    try:
        tokenizer = llm.get_tokenizer()
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        # The released pipeline sampled at temperature 0.6-0.8 with top_p 0.95.
        (result,) = best_of_n(llm, [chat], n=num_samples, temperature=0.7, top_p=0.95, max_tokens=max_new_tokens)
        rule = StepRule.from_tokenizer(tokenizer)
    finally:
        _shutdown(llm)
    candidates = result.candidates
    scores = _as_trajectory_scores(candidates)
    prompt_length = len(result.prompt_token_ids)

    echo(f"prompt: {prompt!r}; {num_samples} candidates from one engine pass, up to {max_new_tokens} new tokens each\n")
    echo(_backend_line())
    sequences = [torch.tensor(result.prompt_token_ids + list(c.token_ids)) for c in candidates]
    best = _report(scores, sequences, prompt_length, rule, num_samples, echo)
    echo("  " + _snippet(candidates[best].text))
    if tiny:
        model, _, head, rule = load_model(model_dir)
        again = score_sequences_hf(model, head, rule, sequences)
        same_positions = torch.equal(again.positions, scores.positions)
        difference = float((again.step_scores - scores.step_scores).abs().max()) if scores.step_scores.numel() else 0.0
        echo(
            f"\ncross-check, HuggingFace forward over the same tokens: step positions "
            f"{'identical' if same_positions else 'DIFFER'}, largest step-score difference {difference:.2e}"
        )
    return DemoResult([result.prompt + c.text if result.prompt else c.text for c in candidates], scores, best)


def engine_options() -> dict:
    """``vllm.LLM`` options for this machine: vLLM's defaults on a GPU; on a CPU, KV blocks of 32
    tokens (the CPU engine wants a multiple of 32), a share of host memory that leaves room for the
    rest (vLLM reads gpu_memory_utilization as that share, and its default 0.92 fails as soon as
    anything else holds memory), and no graph capture."""
    if torch.cuda.is_available():
        return {}
    return dict(block_size=32, gpu_memory_utilization=0.3, enforce_eager=True)


def _shutdown(llm) -> None:
    """Stop the engine and release what an in-process engine holds (its distributed group)."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


def _snippet(text: str, limit: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else "..." + text[-limit:]
