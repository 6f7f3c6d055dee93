"""A deterministic tiny Qwen2/Qwen3 model with an SPRM head, built locally (no hub) for demos and tests.

The tokenizer is a byte-level BPE trained on the spot, in which ``.\\n\\n``, ``<think>`` and
``</think>`` are single tokens. The weights are random, except that the LM head is biased toward
the step and thinking tokens, so that sampled trajectories contain many steps and thinking regions
(the scoring paths then have something to score).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .head import SPRMHead

STEP_TEXT = ".\n\n"
THINK_START, THINK_END = "<think>", "</think>"
EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Logit offsets added through a constant embedding coordinate (see _bias_lm_head).
STEP_LOGIT_BIAS = 4.0
THINK_LOGIT_BIAS = 2.0
EOS_LOGIT_BIAS = 0.5

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)

_WORDS = (
    "the answer is we compute first then so let check step value sum of two three four five "
    "add multiply divide result equals therefore because number total each next wait verify "
    "case odd even prime square root plus minus times over half double zero one"
).split()


def _corpus(seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(400):
        count = int(torch.randint(4, 14, (1,), generator=generator))
        picks = torch.randint(0, len(_WORDS), (count,), generator=generator).tolist()
        digits = torch.randint(0, 1000, (2,), generator=generator).tolist()
        lines.append(" ".join(_WORDS[i] for i in picks) + f" {digits[0]} + {digits[1]}{STEP_TEXT}")
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A ``PreTrainedTokenizerFast`` with single-token ``.\\n\\n``, ``<think>`` and ``</think>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [EOS, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    # Added (not special) so they survive decoding, and matched before BPE splits them.
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in (THINK_START, THINK_END, STEP_TEXT)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )


def build_config(arch: str, vocab_size: int, eos_token_id: int):
    from transformers import Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention rejects smaller heads
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        dtype="float32",
    )
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "qwen2":
        common.pop("head_dim")  # Qwen2 derives it: 128 / 2 heads = 64
        return Qwen2Config(**common)
    raise ValueError(f"make-tiny-model: --arch must be qwen2 or qwen3, got {arch!r}")


def _bias_lm_head(model, tokenizer) -> None:
    """Make step and think tokens frequent: a constant coordinate in every embedding survives the
    (small, random) layers and the final RMSNorm, so the LM head's column on it acts as a bias."""
    embed = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings().weight
    hidden = embed.shape[1]
    with torch.no_grad():
        embed[:, 0] = 1.0
        # After RMSNorm the constant coordinate is about sqrt(hidden) / sqrt(1 + hidden * std^2).
        scale = 1.0 / (hidden**0.5 / (1 + hidden * 0.02**2) ** 0.5)
        lm_head[:, 0] = 0.0
        for text, bias in (
            (STEP_TEXT, STEP_LOGIT_BIAS),
            (THINK_START, THINK_LOGIT_BIAS),
            (THINK_END, THINK_LOGIT_BIAS),
            (EOS, EOS_LOGIT_BIAS),
        ):
            (token_id,) = tokenizer.encode(text, add_special_tokens=False)
            lm_head[token_id, 0] = bias * scale


def _spread_head(head: SPRMHead, model, tokenizer, seed: int) -> SPRMHead:
    """Calibrate a random head so its step scores spread over (0, 1) on the tiny model's hidden states.

    ``h`` of the tiny model is far from zero-mean and unit-scale (the constant embedding coordinate of
    _bias_lm_head dominates it), so a default-initialized head gives every step about the same score.
    Whitening ``h`` with statistics of the corpus text inside W1/b1, and centering the logit with b2,
    makes the logit vary by about one unit from step to step.
    """
    text = "".join(_corpus(seed)[:16])
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-2][0].float()
        mean, std = h.mean(0), h.std(0).clamp_min(1e-6)
        w1, b1, w2, b2 = head.weights
        d = head.hidden_size
        w1.copy_(torch.randn_like(w1) / (std * d**0.5))
        b1.copy_(-(w1 @ mean))
        w2.copy_(torch.randn_like(w2) * (2.0 / (2 * d) ** 0.5) * 3.0)
        b2.zero_()
        b2.copy_(-head.eval()(h).mean().reshape(1))
    return head


def make_tiny_model(directory: str | Path, arch: str = "qwen3", seed: int = 0, head_file: str = "safetensors") -> Path:
    """Write a tiny ``arch`` model, its tokenizer and a random SPRM head into ``directory``.

    ``head_file``: ``"safetensors"`` writes ``sprm_head.safetensors``; ``"pt"`` writes the released
    ``score_module.pt`` layout. Same seed, same files.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; name a new or existing directory")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed)
    config = build_config(arch, len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _bias_lm_head(model, tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id, "do_sample": True})
    )

    torch.manual_seed(seed + 1)
    head = _spread_head(SPRMHead(config.hidden_size), model, tokenizer, seed)
    if head_file == "pt":
        torch.save(head.state_dict(), directory / "score_module.pt")
    elif head_file == "safetensors":
        head.save_pretrained(directory)
    else:
        raise ValueError(f"make_tiny_model: head_file must be 'safetensors' or 'pt', got {head_file!r}")
    return directory
