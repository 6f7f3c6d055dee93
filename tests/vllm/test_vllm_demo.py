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


def test_eval_command_runs_best_of_n_with_and_without_pruning(tiny_qwen3, tmp_path, capsys):
    """The mechanics on the tiny model: every mode asked for, unpruned and pruned, with its tokens,
    time and accuracy (0 here: random weights box no answer)."""
    import json

    from xbai_kernels import cli

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"what is {k} + {k}?", "answer": 2 * k}) + "\n" for k in range(3)))
    policy = json.dumps({"policy": "relative", "steps": [1, 2], "keep": [0.5, 0.25]})
    out = tmp_path / "eval"
    assert cli.main(["eval", str(data), "--model", str(tiny_qwen3), "--modes", "low,medium", "--max-tokens", "64",
                     "--prune", policy, "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 0 and result["problems"] == 3
    runs = {(run["mode"], run["prune"] is not None): run for run in result["runs"]}
    assert set(runs) == {("low", False), ("low", True), ("medium", False), ("medium", True)}
    for run in runs.values():
        assert 0.0 <= run["accuracy"] <= run["any_correct"] <= 1.0 and run["decode_tokens"] > 0
    assert runs[("medium", False)]["pruned_fraction"] == 0.0 and runs[("medium", True)]["pruned_fraction"] > 0.0
    assert "medium N=8  pruned" in capsys.readouterr().out
