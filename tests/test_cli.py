"""The ``xbai-kernels`` command: make-tiny-model, convert, demo, bench (through main(argv) and a subprocess)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xbai_kernels import SPRMHead, cli


def test_make_tiny_model_then_convert(tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert cli.main(["make-tiny-model", str(model_dir), "--arch", "qwen2", "--seed", "3", "--head-format", "pt"]) == 0
    assert "score_module.pt" in capsys.readouterr().out
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2"
    assert not (model_dir / "sprm_head.safetensors").exists()

    assert cli.main(["convert", str(model_dir / "score_module.pt"), str(tmp_path / "converted")]) == 0
    written = tmp_path / "converted" / "sprm_head.safetensors"
    assert str(written) in capsys.readouterr().out
    original = torch.load(model_dir / "score_module.pt", weights_only=True)
    converted = SPRMHead.from_pretrained(written).state_dict()
    assert all(torch.equal(original[k], converted[k]) for k in original)

    # A model directory works as SRC too, and a .safetensors path as DST.
    assert cli.main(["convert", str(model_dir), str(tmp_path / "head.safetensors")]) == 0
    assert (tmp_path / "head.safetensors").is_file()


def test_convert_refuses_a_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "score_module.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert cli.main(["convert", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not a plain tensor checkpoint" in err and "Unsupported operand" in err
    assert "weights_only" not in err  # never advise an unrestricted load
    assert not (tmp_path / "out").exists()


@pytest.fixture(autouse=True)
def hf_demo_engine(monkeypatch):
    """These tests pin the HuggingFace demo path; the vLLM one is tested in tests/vllm/test_vllm_demo.py."""
    monkeypatch.setenv("XBAI_DEMO_ENGINE", "hf")


def _printed_scores(out: str) -> list[float]:
    return [float(m) for m in re.findall(r"^trajectory \d+: .* score ([0-9.]+)$", out, flags=re.M)]


def test_demo_on_a_model_directory(tiny_model_dir, capsys):
    assert cli.main(["demo", "--model", str(tiny_model_dir), "-n", "3", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    scores = _printed_scores(out)
    assert len(scores) == 3
    assert out.count("step scores:") == 3
    pick = int(re.search(r"Best-of-3 pick: trajectory (\d+)", out).group(1))
    assert scores[pick] == max(scores)


def test_demo_scores_are_the_package_scores(tiny_model_dir):
    """The demo's numbers are score_trajectories on HF hidden_states[-2], trajectory by trajectory."""
    from xbai_kernels import score_trajectories
    from xbai_kernels.demo import hidden_states_for_scoring, load_model, run_demo, sample_trajectories

    lines: list[str] = []
    result = run_demo(tiny_model_dir, num_samples=2, max_new_tokens=16, seed=5, echo=lines.append)
    model, tokenizer, head, rule = load_model(tiny_model_dir)
    trajectories = sample_trajectories(model, tokenizer, "What is the sum of two three and four? Think step by step.", 2, 16, 5)
    for s, ids in enumerate(trajectories):
        alone = score_trajectories(hidden_states_for_scoring(model, ids), ids, head, rule)
        # The demo scores all trajectories in one packed call: the CPU BLAS blocks its matmuls by row
        # count, so fp32 rounding differs from a call on one trajectory (random weights make each logit
        # a sum of terms far larger than itself: ~1e-5 on the logits, a few 1e-6 on the scores).
        torch.testing.assert_close(result.scores[s].step_scores, alone.step_scores, atol=1e-5, rtol=1e-4)
        assert result.scores[s].positions.numel() > 0
    assert result.best == int(torch.argmax(result.scores.scores))


def test_demo_builds_the_tiny_model_in_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cli.main(["demo", "-n", "2", "--max-new-tokens", "8"]) == 0
    model_dir = tmp_path / "cache" / "xbai-kernels" / "tiny-qwen3-seed0"
    assert (model_dir / "config.json").is_file() and (model_dir / "sprm_head.safetensors").is_file()
    first = capsys.readouterr().out
    assert len(_printed_scores(first)) == 2
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["demo", "-n", "2", "--max-new-tokens", "8"]) == 0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert capsys.readouterr().out == first  # same seed, same output
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left over


def test_demo_rejects_bad_counts(capsys):
    assert cli.main(["demo", "-n", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_bench_writes_under_the_working_directory_and_says_what_a_cpu_measures(tmp_path, monkeypatch, capsys):
    """From any directory (no checkout needed): results in ./xbai-kernels-bench, never in the package."""
    import xbai_kernels

    monkeypatch.chdir(tmp_path)
    package_files = sorted(Path(xbai_kernels.__file__).parent.rglob("*.json"))
    assert cli.main(["bench", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "only the reference path" in out and "need an NVIDIA GPU" in out and "spread" in out
    (written,) = (tmp_path / "xbai-kernels-bench").glob("ops-cpu-*.json")
    result = json.loads(written.read_text())
    cases = {row["case"] for row in result["rows"]}
    assert len(cases) == 4 and all(row["backend"] == "reference" for row in result["rows"])
    assert all(row["min_us"] <= row["median_us"] <= row["max_us"] for row in result["rows"])
    assert sorted(Path(xbai_kernels.__file__).parent.rglob("*.json")) == package_files


def test_bench_writes_where_the_user_says(tmp_path, monkeypatch):
    from xbai_kernels import bench

    monkeypatch.setattr(bench, "cases", lambda device, d, quick: {"noop": lambda: None})
    assert cli.main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path / "mine")]) == 0
    (written,) = (tmp_path / "mine").glob("ops-cpu-*.json")
    assert json.loads(written.read_text())["rows"][0]["case"] == "noop"


def test_usage_errors_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["make-tiny-model", "x", "--arch", "llama"])
    assert "invalid choice" in capsys.readouterr().err


def test_command_line_entry_points(tmp_path):
    """``python -m xbai_kernels.cli`` always; the installed ``xbai-kernels`` script when it is installed."""
    help_text = subprocess.run(
        [sys.executable, "-m", "xbai_kernels.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("make-tiny-model", "convert", "demo", "bench"):
        assert command in help_text
    script = shutil.which("xbai-kernels") or str(Path(sys.executable).parent / "xbai-kernels")
    if not Path(script).is_file():
        pytest.skip("the xbai-kernels script is not installed (pip install -e . installs it)")
    done = subprocess.run([script, "make-tiny-model", str(tmp_path / "m")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "sprm_head.safetensors").is_file()


# ----- the rough edges a first user hit: each error is one clear line, and nothing is half-written -----


def _model_with_head(tiny_model_dir, target: Path, head_size: int | None) -> Path:
    """A copy of the tiny model whose head is of ``head_size`` (None: no head at all)."""
    shutil.copytree(tiny_model_dir, target)
    (target / "sprm_head.safetensors").unlink()
    if head_size is not None:
        SPRMHead(head_size).save_pretrained(target)
    return target


def test_convert_refuses_a_model_directory_whose_head_does_not_fit(tiny_model_dir, tmp_path, capsys):
    model = _model_with_head(tiny_model_dir, tmp_path / "model", head_size=64)
    assert cli.main(["convert", str(model), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "hidden size 64" in err and "model's hidden size is 128" in err
    assert not (tmp_path / "out").exists()


def test_convert_to_a_pt_name_refuses_instead_of_making_a_directory(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["convert", str(tiny_model_dir), str(tmp_path / "x.pt")]) == 1
    assert "convert writes safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_convert_to_a_safetensors_path_leaves_a_head_beside_it_alone(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = (model / "sprm_head.safetensors").read_bytes()
    SPRMHead(128).save_file(tmp_path / "other.safetensors")
    assert cli.main(["convert", str(tmp_path / "other.safetensors"), str(model / "copy.safetensors")]) == 0
    assert (model / "sprm_head.safetensors").read_bytes() == before
    assert (model / "copy.safetensors").is_file()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("no-head", "no SPRM head in"),
        ("wrong-size", "the head has hidden size 64 but the model's hidden size is 128"),
    ],
)
def test_demo_on_a_bad_model_directory_fails_in_one_line_before_loading(tiny_model_dir, tmp_path, case, expected):
    model = {
        "missing": lambda: tmp_path / "nowhere",
        "no-head": lambda: _model_with_head(tiny_model_dir, tmp_path / "model", None),
        "wrong-size": lambda: _model_with_head(tiny_model_dir, tmp_path / "model", 64),
    }[case]()
    done = subprocess.run(
        [sys.executable, "-m", "xbai_kernels.cli", "demo", "--model", str(model), "-n", "1", "--max-new-tokens", "4"],
        capture_output=True, text=True, env={**os.environ, "XBAI_DEMO_ENGINE": "hf"},
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "trajectory" not in done.stdout


def test_make_tiny_model_on_an_existing_file_says_so(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert cli.main(["make-tiny-model", str(afile)]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    assert afile.read_text() == "keep me"


def test_a_refused_pickle_gives_no_advice_to_load_unrestricted(tmp_path):
    """Not in the message, and not in the traceback a Python caller sees (torch's own error ends with it)."""
    import traceback

    from xbai_kernels.head import CheckpointError

    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8)), tmp_path / "score_module.pt")
    with pytest.raises(CheckpointError) as refused:
        SPRMHead.from_pretrained(tmp_path / "score_module.pt")
    shown = "".join(traceback.format_exception(refused.value))
    assert "Unsupported global" in shown and "weights_only" not in shown


def test_demo_output_explains_its_numbers(tiny_model_dir, capsys):
    assert cli.main(["demo", "--model", str(tiny_model_dir), "-n", "2", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "geometric mean of the step scores" in out
    if not torch.cuda.is_available():
        assert "on a CPU only the reference path runs" in out
    lines = re.findall(r"^trajectory \d+: (\d+) tokens \((\d+) prompt \+ (\d+) generated\), (\d+) step tokens, (\d+) scored", out, re.M)
    assert len(lines) == 2
    for total, prompt, generated, step_tokens, scored in (map(int, line) for line in lines):
        assert total == prompt + generated and scored <= step_tokens
