"""The h that apply_sprm captures is HuggingFace's output_hidden_states[-2] (the input of the last layer)."""

from __future__ import annotations

import pytest
import torch

from xbai_kernels.tiny import build_config, build_tokenizer
from xbai_kernels.transformers import STATE_ATTRIBUTE, apply_sprm, revert_sprm

ARCHS = ("qwen2", "qwen3", "llama")


def tiny_causal_lm(arch: str, num_layers: int = 3, seed: int = 0):
    """A random tiny model of ``arch`` (Llama built with the tiny Qwen shapes) and its tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    if arch == "llama":
        qwen = build_config("qwen2", len(tokenizer), tokenizer.eos_token_id)
        config = LlamaConfig(
            vocab_size=qwen.vocab_size,
            hidden_size=qwen.hidden_size,
            intermediate_size=qwen.intermediate_size,
            num_attention_heads=qwen.num_attention_heads,
            num_key_value_heads=qwen.num_key_value_heads,
            max_position_embeddings=qwen.max_position_embeddings,
            rms_norm_eps=qwen.rms_norm_eps,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
    else:
        config = build_config(arch, len(tokenizer), tokenizer.eos_token_id)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[0]] * num_layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tokenizer


def captured_h(model, **inputs) -> torch.Tensor:
    """h as the package captures it: with the capture switched on, the patched last layer keeps its input."""
    state = model.__dict__[STATE_ATTRIBUTE]
    state.capturing, state.hidden = True, None
    try:
        model(**inputs)
        return state.hidden
    finally:
        state.capturing, state.hidden = False, None


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_h_is_hidden_states_minus_two(arch):
    model, tokenizer = tiny_causal_lm(arch)
    texts = ["we compute the sum.\n\nthen add 3 + 4.\n\n", "so the answer is 7.\n\n"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True).hidden_states[-2]
        apply_sprm(model, rule=tokenizer.encode(".\n\n", add_special_tokens=False)[0])
        got = captured_h(model, **batch)
    assert got.shape == expected.shape == (2, batch["input_ids"].shape[1], model.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # It is not the final-norm output (hidden_states[-1]) nor an earlier layer's input.
    with torch.no_grad():
        all_states = model(**batch, output_hidden_states=True).hidden_states
    assert not torch.allclose(got, all_states[-1]) and not torch.allclose(got, all_states[-3])
    revert_sprm(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_keeps_nothing_after_the_forward(arch):
    model, tokenizer = tiny_causal_lm(arch, num_layers=2)
    apply_sprm(model, rule=tokenizer.encode(".\n\n", add_special_tokens=False)[0])
    batch = tokenizer(["check the value.\n\nthe total.\n\n"], return_tensors="pt")
    out = model(**batch, sprm_rewards=torch.tensor([1.0]))
    state = model.__dict__[STATE_ATTRIBUTE]
    assert state.hidden is None and not state.capturing
    # A plain call (no sprm_rewards) does not capture at all.
    model(**batch)
    assert state.hidden is None
    assert "sprm_loss" in out and "sprm_loss" not in model(**batch)
