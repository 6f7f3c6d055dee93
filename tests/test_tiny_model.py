"""make_tiny_model: deterministic, local, single-token markers, loadable as Qwen2 and Qwen3."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from xbai_kernels import SPRMHead, StepRule
from xbai_kernels.tiny import make_tiny_model


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", arch="qwen2", seed=0)


def test_same_seed_same_bytes(tiny_model_dir, tmp_path):
    again = make_tiny_model(tmp_path / "again", arch="qwen3", seed=0)
    first, second = _digests(tiny_model_dir), _digests(again)
    assert {"config.json", "model.safetensors", "tokenizer.json", "sprm_head.safetensors"} <= set(first)
    assert first == second


def test_other_seed_other_weights(tiny_model_dir, tmp_path):
    other = _digests(make_tiny_model(tmp_path / "other", arch="qwen3", seed=1))
    ours = _digests(tiny_model_dir)
    assert other["model.safetensors"] != ours["model.safetensors"]
    assert other["sprm_head.safetensors"] != ours["sprm_head.safetensors"]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_markers_are_single_tokens_and_model_runs(arch, tiny_model_dir, qwen2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_model_dir if arch == "qwen3" else qwen2_dir
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == arch
    tokenizer = AutoTokenizer.from_pretrained(directory)
    for text in (".\n\n", "<think>", "</think>"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)
        assert tokenizer.decode(ids) == text
    # The step token stays one token inside running text too (it is an added token).
    step_id = tokenizer.encode(".\n\n", add_special_tokens=False)[0]
    assert tokenizer.encode("so the sum is 7.\n\nthen", add_special_tokens=False).count(step_id) == 1

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    # vLLM's CPU attention needs head_dim 64.
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    assert getattr(model.config, "head_dim", 64) == 64
    head = SPRMHead.from_pretrained(directory, hidden_size=model.config.hidden_size)
    rule = StepRule.from_tokenizer(tokenizer)
    assert rule.step_token_ids == (step_id,)

    ids = torch.tensor([tokenizer.encode("<think>\nwe add two.\n\nthen three.\n\n</think>", add_special_tokens=False)])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    logits = head.eval()(out.hidden_states[-2][0])
    assert logits.shape == (ids.shape[1],) and torch.isfinite(logits).all()


def test_released_pt_head_format(tmp_path):
    directory = make_tiny_model(tmp_path / "pt", arch="qwen3", seed=0, head_file="pt")
    assert (directory / "score_module.pt").is_file()
    assert not (directory / "sprm_head.safetensors").exists()
    state = torch.load(directory / "score_module.pt", weights_only=True)
    assert tuple(state) == ("0.weight", "0.bias", "3.weight", "3.bias")
    # Same seed: the same head whichever format holds it.
    reference = SPRMHead.from_pretrained(make_tiny_model(tmp_path / "st", arch="qwen3", seed=0))
    assert torch.equal(SPRMHead.from_pretrained(directory)[0].weight, reference[0].weight)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--arch must be qwen2 or qwen3"):
        make_tiny_model(tmp_path / "a", arch="llama")
    with pytest.raises(ValueError, match="head_file must be 'safetensors' or 'pt'"):
        make_tiny_model(tmp_path / "b", head_file="bin")


def test_sampling_produces_steps_and_markers(tiny_model_dir):
    """The biased LM head makes sampled text rich in steps, so the demo and the scorers have work."""
    from xbai_kernels.demo import load_model, sample_trajectories

    model, tokenizer, _, rule = load_model(tiny_model_dir)
    trajectories = sample_trajectories(model, tokenizer, "add two and three", 2, 40, seed=0)
    completions = torch.cat(trajectories)
    assert int(torch.isin(completions, rule.step_ids_tensor()).sum()) >= 5
