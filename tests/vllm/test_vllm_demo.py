"""``xbai-kernels demo`` through vLLM: candidates, step scores and the pick, cross-checked against HF."""

from __future__ import annotations

import re

import pytest

from vllm_helpers import requires_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]


def test_demo_runs_best_of_n_through_vllm(tiny_qwen3, monkeypatch, capsys):
    from xbai_kernels import cli

    monkeypatch.setenv("XBAI_DEMO_ENGINE", "vllm")
    assert cli.main(["demo", "--model", str(tiny_qwen3), "-n", "4", "--max-new-tokens", "48"]) == 0
    out = capsys.readouterr().out
    assert "served by vLLM" in out and "one engine pass" in out
    scores = [float(m) for m in re.findall(r"^trajectory \d+: .* score ([0-9.]+)$", out, flags=re.M)]
    assert len(scores) == 4 and out.count("step scores:") == 4
    pick = int(re.search(r"Best-of-4 pick: trajectory (\d+)", out).group(1))
    assert scores[pick] == max(scores)


def test_demo_cross_check_on_the_tiny_model(tmp_path, monkeypatch):
    from xbai_kernels.demo import run_demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lines: list[str] = []
    result = run_demo(None, num_samples=2, max_new_tokens=32, engine="vllm", echo=lines.append)
    check = next(line for line in lines if line.strip().startswith("cross-check"))
    assert "step positions identical" in check
    assert float(check.rsplit(" ", 1)[-1]) < 2.0**-8
    assert len(result.texts) == 2 and result.best in (0, 1)
