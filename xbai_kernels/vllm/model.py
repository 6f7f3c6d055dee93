"""Qwen2/Qwen3 causal LMs for vLLM that also hand ``h`` (the input of the last decoder layer) to the SPRM head.

vLLM compiles ``Qwen2Model.forward`` (Qwen3 reuses it), so forward hooks would not fire. Its
EAGLE-3 auxiliary-hidden-state mechanism, asked for layer L-1, returns exactly
``hidden_states + residual`` entering the last layer, from inside the compiled graph. The
subclasses copy it into a persistent buffer (a fixed address, as CUDA graphs need) and return the
ordinary hidden states, so the rest of vLLM sees a plain causal LM.

Registered (by string, see ``register``) under the stock names ``Qwen2ForCausalLM`` and
``Qwen3ForCausalLM``: a checkpoint directory holding an SPRM head is served with scoring on; one
without a head runs exactly as the stock class. ``Qwen2SPRMForCausalLM`` /
``Qwen3SPRMForCausalLM`` name them explicitly (``hf_overrides={"architectures": [...]}``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ..head import HEAD_KEYS, SPRMHead
from ..rule import StepRule
from ..ops import dispatch
from . import config as sprm_config
from . import patches
from .runtime import SPRMRuntime

logger = logging.getLogger("xbai_kernels.vllm")


def _refuse_unsupported(vllm_config) -> None:
    if vllm_config.speculative_config is not None:
        raise ValueError(
            "xbai_kernels SPRM scoring cannot run with speculative decoding: it reads the EAGLE-3 auxiliary "
            "hidden states that speculative methods (EAGLE-3 drafts above all) also claim, and the drafted "
            "tokens would need per-token acceptance tracking. Disable speculative decoding, or turn scoring "
            "off with XBAI_SPRM=0 / hf_overrides={'xbai_sprm': False}."
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(
            "xbai_kernels SPRM scoring supports pipeline_parallel_size=1 only (the scored hidden state lives "
            "on the last stage); use tensor parallelism, or XBAI_SPRM=0."
        )


def _build_runtime(vllm_config, hf_config) -> SPRMRuntime | None:
    model_config = vllm_config.model_config
    location = sprm_config.head_location(model_config)
    if location is None:
        if sprm_config.scoring_requested(model_config):
            logger.info("xbai_kernels: no SPRM head for %s; serving it unscored", model_config.model)
        return None
    _refuse_unsupported(vllm_config)
    from vllm.tokenizers import cached_tokenizer_from_config

    tokenizer = cached_tokenizer_from_config(model_config)
    if tokenizer is None:
        raise ValueError("xbai_kernels SPRM scoring needs the tokenizer (skip_tokenizer_init must be off)")
    rule = StepRule.from_tokenizer(tokenizer, lang=sprm_config.step_language(model_config))
    device = vllm_config.device_config.device
    head = SPRMHead.from_pretrained(
        location, hidden_size=hf_config.hidden_size, device=device, dtype=model_config.dtype
    ).eval()
    scheduler = vllm_config.scheduler_config
    max_tokens = max(scheduler.max_num_batched_tokens, vllm_config.compilation_config.max_cudagraph_capture_size or 0)
    runner = _model_runner(vllm_config)
    runtime = SPRMRuntime(
        head, rule, hf_config.vocab_size, max_tokens, scheduler.max_num_seqs, dtype=model_config.dtype, runner=runner,
        block_size=vllm_config.cache_config.block_size,
    )
    patches.apply(f"runner_{runner}")
    logger.info(
        "xbai_kernels: SPRM scoring on for %s (head %s, d=%d, %d step token(s), model runner %s, backend %s)",
        model_config.model,
        location,
        head.hidden_size,
        len(rule.step_token_ids),
        runner.upper(),
        dispatch.resolve("head_logits_masked", head[0].weight.device, head.scoring_inputs())[0],
    )
    return runtime


def _model_runner(vllm_config) -> str:
    """"v2" when this engine runs Model Runner V2 (vLLM's GPU default), else "v1" (the CPU runner
    subclasses V1's)."""
    on_gpu = vllm_config.device_config.device.type == "cuda"
    return "v2" if on_gpu and getattr(vllm_config, "use_v2_model_runner", False) else "v1"


class _SPRMScoring:
    """Mixin placed before a vLLM Qwen causal LM: capture ``h`` when scoring is on, pass through otherwise."""

    sprm: SPRMRuntime | None

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = self.config
        self.sprm = _build_runtime(vllm_config, hf_config)
        if self.sprm is not None:
            # SPEC: h enters the LAST decoder layer, i.e. what the aux mechanism reports for index L-1.
            self.model._set_aux_hidden_state_layers((hf_config.num_hidden_layers - 1,))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        output = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        if self.sprm is None or not isinstance(output, tuple):
            return output
        hidden_states, (last_layer_input,) = output
        rows = last_layer_input.shape[0]
        # Profiling runs may exceed the scheduler's token budget; their hidden states are never scored.
        if rows <= self.sprm.hidden.shape[0]:
            self.sprm.hidden[:rows].copy_(last_layer_input)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        # vLLM loads every *.safetensors of the directory, sprm_head.safetensors included: the head
        # is loaded separately, in the model dtype, so its keys are dropped here.
        return super().load_weights((name, tensor) for name, tensor in weights if name not in HEAD_KEYS)


class Qwen2SPRMForCausalLM(_SPRMScoring, Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` that feeds the SPRM head (see the module docstring)."""


class Qwen3SPRMForCausalLM(_SPRMScoring, Qwen3ForCausalLM):
    """``Qwen3ForCausalLM`` that feeds the SPRM head (see the module docstring)."""
