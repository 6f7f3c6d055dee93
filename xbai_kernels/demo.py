"""The demo: Best-of-N on a tiny local model, every trajectory scored step by step with the SPRM head.

This version samples with HuggingFace ``generate`` and then scores the finished trajectories the way
the released pipeline does (one more forward over each whole text to read ``h``), which is the path
the package exists to remove from serving; ``hidden_states_for_scoring`` and ``score_sequences_hf``
are kept as functions so the vLLM demo can reuse them as its cross-check.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .head import SAFETENSORS_FILENAME, SPRMHead
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

    SPEC: ``h`` is the input of the last decoder layer, i.e. ``output_hidden_states[-2]``.
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
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"].to(model.device)
    torch.manual_seed(seed)
    # SPEC: the released pipeline sampled at temperature 0.6-0.8 with top_p 0.95.
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


@dataclass
class DemoResult:
    texts: list[str]
    scores: TrajectoryScores
    best: int


def run_demo(
    model_dir: str | Path | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 96,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Sample ``num_samples`` trajectories, score every step, print them and the Best-of-N pick."""
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
    texts = []
    for s, ids in enumerate(trajectories):
        one = scores[s]
        texts.append(tokenizer.decode(ids))
        step_scores = " ".join(f"{p:.4f}" for p in one.step_scores.tolist()) or "(no step)"
        echo(f"trajectory {s}: {ids.numel()} tokens, {one.positions.numel()} steps, score {one.score:.4f}")
        echo(f"  step scores: {step_scores}")
    best = int(torch.argmax(scores.scores)) if len(scores) else 0
    echo(f"\nBest-of-{num_samples} pick: trajectory {best} (score {float(scores.scores[best]):.4f})")
    echo("  " + _snippet(tokenizer.decode(trajectories[best][-48:])))
    return DemoResult(texts, scores, best)


def _snippet(text: str, limit: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else "..." + text[-limit:]
