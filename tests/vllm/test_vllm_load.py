"""The OpenAI server under load: every choice carries its scores, streamed or not, at concurrency 32.

When the HTTP handler of a streamed request reads more slowly than the engine produces, vLLM merges
the queued deltas, and before the front end's merge patch the SPRM fields of the finishing delta
were dropped (7 % of streamed choices at this load). One server, on 127.0.0.1 only, bounded in
requests and time:

* 128 requests, 32 at a time: completions and chat, streamed and not, n = 1 and 4 (320 choices, 160
  streamed). Every choice has its three fields on the chunk (or choice) with its ``finish_reason``,
  its positions are SPEC's rule applied to its prompt + completion ids, its score is the geometric
  mean of its step scores;
* 30 clients that disconnect mid-stream, then 20 requests that must all be right; the engine must
  drop the abandoned requests, and the server's memory (its process tree's RSS, after a warm-up of
  the same load) must stay within 5 %.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from test_vllm_server import serve
from vllm_helpers import requires_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

CONCURRENCY = 32
MAX_TOKENS = 48
TEST_BUDGET_S = 240  # every request's deadline; the whole test takes about 1-2 minutes on 2 cores
RSS_TOLERANCE = 0.05
FIELDS = ("sprm_score", "sprm_step_scores", "sprm_step_positions")
PROMPTS = [
    "<think>\nwe compute the sum of two and three",
    "<think>\nfirst check the value then",
    "so the answer is",
    "<think>\nlet each number be odd",
]


@pytest.fixture(scope="module")
def loaded_server(tiny_qwen3, tmp_path_factory):
    log = tmp_path_factory.mktemp("load") / "vllm-serve.log"
    with serve(tiny_qwen3, log, "--max-num-seqs", "128") as (base, process):
        yield base, process.pid


@pytest.fixture(scope="module")
def rule(tiny_qwen3):
    from transformers import AutoTokenizer

    from xbai_kernels import StepRule

    return StepRule.from_tokenizer(AutoTokenizer.from_pretrained(str(tiny_qwen3)))


def _body(model: str, index: int, stream: bool, n: int, max_tokens: int = MAX_TOKENS) -> tuple[str, dict]:
    body = {"model": model, "n": n, "max_tokens": max_tokens, "temperature": 1.0, "return_token_ids": True,
            "stream": stream}
    prompt = PROMPTS[index % len(PROMPTS)]
    # Logprobs make the front end's work per token heavier than the engine's (tiny model): the
    # handlers fall behind and vLLM merges queued deltas, the path this test exists for.
    if index % 2:
        messages = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", {**body, "messages": messages, "logprobs": True, "top_logprobs": 5}
    return "/v1/completions", {**body, "prompt": prompt, "logprobs": 5}


def _request(base: str, path: str, body: dict) -> list[dict]:
    """The choices of one request, each as {index, prompt_ids, token_ids, finish_reason, fields...};
    for a stream, ``early_fields`` lists SPRM fields seen on a chunk that did not finish its choice."""
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TEST_BUDGET_S) as response:
        if not body["stream"]:
            data = json.load(response)
            prompt_ids = data.get("prompt_token_ids")
            return [
                {**choice, "prompt_ids": prompt_ids or choice.get("prompt_token_ids"), "early_fields": []}
                for choice in data["choices"]
            ]
        choices: dict[int, dict] = {}
        prompt_ids = None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            prompt_ids = chunk.get("prompt_token_ids") or prompt_ids
            for part in chunk.get("choices") or ():
                choice = choices.setdefault(part["index"], {"index": part["index"], "token_ids": [], "early_fields": []})
                choice["token_ids"].extend(part.get("token_ids") or [])
                choice["prompt_ids"] = part.get("prompt_token_ids") or choice.get("prompt_ids") or prompt_ids
                if part.get("finish_reason") is None:
                    choice["early_fields"] += [name for name in FIELDS if name in part]
                    continue
                choice["finish_reason"] = part["finish_reason"]
                choice.update({name: part[name] for name in part if name.startswith("sprm_")})
        for choice in choices.values():
            choice["prompt_ids"] = choice.get("prompt_ids") or prompt_ids
        return list(choices.values())


def _geomean(step_scores: list[float]) -> float:
    if not step_scores:
        return 0.0
    return math.exp(sum(math.log(max(p, 1e-10)) for p in step_scores) / len(step_scores))


def _problems(choice: dict, rule) -> list[str]:
    """What is wrong with one choice (empty when it is right)."""
    from xbai_kernels.scoring import step_mask

    missing = [name for name in FIELDS if name not in choice]
    if missing or choice.get("finish_reason") is None:
        return [f"choice {choice['index']}: missing {missing or 'finish_reason'}"]
    problems = []
    if choice.get("sprm_error") is not None:
        problems.append(f"sprm_error {choice['sprm_error']}")
    if choice["early_fields"]:
        problems.append(f"fields before the finishing chunk: {choice['early_fields']}")
    scores, positions = choice["sprm_step_scores"], choice["sprm_step_positions"]
    if len(scores) != len(positions):
        problems.append(f"{len(scores)} step scores for {len(positions)} positions")
    if not math.isclose(choice["sprm_score"], _geomean(scores), rel_tol=1e-5, abs_tol=1e-7):
        problems.append(f"score {choice['sprm_score']} is not the geometric mean {_geomean(scores)}")
    ids = torch.tensor(list(choice["prompt_ids"]) + list(choice["token_ids"]), dtype=torch.int64)
    expected = step_mask(ids, rule).nonzero().squeeze(-1).tolist()
    if positions != expected:
        problems.append(f"positions {positions} are not SPEC's {expected}")
    return problems


def _run(base: str, model: str, plan: list[tuple[int, bool, int]], rule) -> tuple[list[dict], list[str]]:
    """Send ``plan`` (index, stream, n) at CONCURRENCY; return (choices, problems)."""

    def one(item):
        index, stream, n = item
        path, body = _body(model, index, stream, n)
        choices = _request(base, path, body)
        problems = [] if len(choices) == n else [f"request {index}: {len(choices)} choices for n = {n}"]
        for choice in choices:
            choice["streamed"] = stream
            problems += [f"request {index} ({path}, stream={stream}, n={n}): {p}" for p in _problems(choice, rule)]
        return choices, problems

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, plan))
    return [c for choices, _ in results for c in choices], [p for _, problems in results for p in problems]


def _plan(count: int, offset: int = 0) -> list[tuple[int, bool, int]]:
    # Cycles through (completions, chat) x (stream, not) x (n = 4, n = 1).
    return [(i, (i // 2) % 2 == 0, 4 if (i // 4) % 2 == 0 else 1) for i in range(offset, offset + count)]


def _disconnect_mid_stream(base: str, model: str, index: int) -> bool:
    """Start a long stream, read its first event, hang up; True when an event had arrived."""
    host, port = base.removeprefix("http://").split(":")
    path, body = _body(model, index, True, 2, max_tokens=400)
    connection = http.client.HTTPConnection(host, int(port), timeout=TEST_BUDGET_S)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        while True:
            line = response.fp.readline()
            if not line or line.startswith(b"data: "):
                return bool(line)
    finally:
        connection.close()


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the API server and its engine core)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def _engine_idle(base: str, timeout_s: float = 60) -> bool:
    """Wait until the engine holds no running or waiting request (the abandoned ones were aborted)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            text = response.read().decode()
        counts = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))
        ]
        if counts and not any(counts):
            return True
        time.sleep(0.5)
    return False


def test_every_choice_scored_under_load(loaded_server, tiny_qwen3, rule):
    base, pid = loaded_server
    model = str(tiny_qwen3)
    started = time.monotonic()

    # Warm-up at the same load, so the memory baseline holds the server's steady-state pools.
    _, problems = _run(base, model, _plan(64, offset=1000), rule)
    assert _engine_idle(base)
    rss_before = _rss_bytes(pid)

    choices, problems = _run(base, model, _plan(128), rule)
    streamed = [c for c in choices if c["streamed"]]
    assert len(choices) == 320 and len(streamed) == 160
    assert not problems, f"{len(problems)} problem(s) among {len(choices)} choices, e.g.:\n" + "\n".join(problems[:10])
    # The tiny model steps often: the scores must be real numbers, not the no-step 0.0.
    steps = sum(len(c["sprm_step_positions"]) for c in choices)
    assert steps >= len(choices), f"only {steps} scored steps in {len(choices)} choices"
    assert len({c["sprm_score"] for c in choices}) > len(choices) // 2
    assert sum(0.0 < c["sprm_score"] < 1.0 for c in choices) > len(choices) * 0.75

    # Clients that hang up mid-stream, all at once; the engine must let their requests go.
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        started_streams = list(pool.map(lambda i: _disconnect_mid_stream(base, model, i), range(2000, 2030)))
    assert all(started_streams), "every abandoned stream had started"
    assert _engine_idle(base), "the engine still holds requests of clients that went away"

    plan = _plan(20, offset=3000)
    choices, problems = _run(base, model, plan, rule)
    assert not problems, "\n".join(problems[:10])
    assert len(choices) == sum(n for _, _, n in plan)

    assert _engine_idle(base)
    rss_after = _rss_bytes(pid)
    growth = (rss_after - rss_before) / rss_before
    assert abs(growth) <= RSS_TOLERANCE, f"server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB ({growth:+.1%})"
    assert time.monotonic() - started < TEST_BUDGET_S
    assert threading.active_count() < 10  # every client thread ended
