"""Best-of-N with and without pruning on problems with known answers: what a policy costs and saves.

``xbai-kernels eval DATA.jsonl --model DIR`` runs this. Each line of DATA is a JSON object with the
problem (``problem``, ``question`` or ``prompt``) and its reference ``answer``. For every mode (low /
medium / high: N = 2 / 8 / 32) Best-of-N runs once unpruned and once with the policy; a pick is
correct when the last ``\\boxed{...}`` of its text equals the reference answer (spaces, ``$`` and a
trailing period aside). Reported per run: accuracy of the pick, the share of problems with any
correct candidate, decode tokens and wall time.

A random-weight model answers nothing correctly: on the tiny model this checks the mechanics only.
With a real checkpoint and a GPU it is how a policy is judged before it is trusted, since what
pruning costs in accuracy depends on how well the checkpoint's head ranks partial solutions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .best_of_n import MODES, best_of_n

PROBLEM_KEYS = ("problem", "question", "prompt")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces inside balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None


def normalize_answer(answer: str) -> str:
    return "".join(str(answer).split()).strip("$").rstrip(".")


def is_correct(text: str, reference) -> bool:
    boxed = extract_boxed(text)
    return boxed is not None and normalize_answer(boxed) == normalize_answer(reference)


def load_problems(path: str | Path) -> list[dict]:
    """[{"problem": str, "answer": str}] from a JSONL file; a bad line is an error naming it."""
    problems = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        problem = next((record[key] for key in PROBLEM_KEYS if isinstance(record, dict) and key in record), None)
        if not isinstance(problem, str) or not isinstance(record, dict) or "answer" not in record:
            raise ValueError(f"{path}:{number}: needs a problem (one of {', '.join(PROBLEM_KEYS)}) and an answer")
        problems.append({"problem": problem, "answer": str(record["answer"])})
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def evaluate(llm, problems: list[dict], modes=("low", "medium", "high"), prune=None, chat: bool = True, **sampling) -> dict:
    """Best-of-N over ``problems`` for each mode, unpruned and (when ``prune`` is given) pruned.

    ``llm``: a ``vllm.LLM`` serving a scored model; ``chat``: wrap each problem in the tokenizer's
    chat template as one user turn; ``sampling``: ``SamplingParams`` options (max_tokens, ...).
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"evaluate: mode must be one of {', '.join(MODES)}, got {mode!r}")
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p["problem"]}], tokenize=False, add_generation_prompt=True)
        if chat else p["problem"]
        for p in problems
    ]
    runs = []
    for mode in modes:
        for policy in (None, prune) if prune is not None else (None,):
            start = time.perf_counter()
            results = best_of_n(llm, prompts, mode=mode, prune=policy, **sampling)
            seconds = time.perf_counter() - start
            candidates = [c for r in results for c in r.candidates]
            runs.append({
                "mode": mode,
                "n": MODES[mode],
                "prune": policy,
                "accuracy": sum(is_correct(r.best.text, p["answer"]) for r, p in zip(results, problems)) / len(problems),
                "any_correct": sum(any(is_correct(c.text, p["answer"]) for c in r.candidates)
                                   for r, p in zip(results, problems)) / len(problems),
                "decode_tokens": sum(len(c.token_ids) for c in candidates),
                "pruned_fraction": sum(c.pruned for c in candidates) / len(candidates),
                "seconds": seconds,
            })
    return {"problems": len(problems), "sampling": sampling, "runs": runs}


def plot(result: dict, path: str | Path) -> None:
    """Accuracy against decode tokens, one point per run (pruned runs hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for run in result["runs"]:
        pruned = run["prune"] is not None
        ax.scatter(run["decode_tokens"], run["accuracy"], facecolors="none" if pruned else "C0", edgecolors="C0")
        ax.annotate(f"{run['mode']}{' pruned' if pruned else ''}", (run["decode_tokens"], run["accuracy"]), fontsize=8)
    ax.set_xlabel("decode tokens")
    ax.set_ylabel("accuracy of the Best-of-N pick")
    ax.set_title(f"{result['problems']} problems")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
