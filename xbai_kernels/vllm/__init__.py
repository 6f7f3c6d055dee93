"""vLLM integration: SPRM step scores from the same decoding pass, in ``LLM.generate`` and the OpenAI server,
and Best-of-N that stops losing candidates while they decode (``best_of_n(..., prune=...)``, ``pruning``).

Installing xbai-kernels registers ``register`` as a ``vllm.general_plugins`` entry point, which
vLLM calls in every process it starts. Supported: vLLM 0.26.x and 0.32.x (``SUPPORTED_VLLM``; every
patched internal is listed in ``patches``), Model Runner V2 (the GPU default) and the V1 runner
(the CPU engine's), no speculative decoding, no pipeline parallelism. Importing this package imports no vLLM
and touches no CUDA; ``register`` imports vLLM modules but initializes no device.

Switches (see ``config``): ``XBAI_SPRM=0`` turns everything off, ``XBAI_SPRM_HEAD=PATH`` points at
a head elsewhere, ``XBAI_SPRM_LANG=zh`` picks the Chinese step set; the same per engine through
``hf_overrides={"xbai_sprm": ..., "xbai_sprm_head": ..., "xbai_sprm_lang": ...}``.
"""

from __future__ import annotations

import logging

from .best_of_n import MODES, BestOfN, Candidate, best_of_n
from .patches import SUPPORTED_VLLM, check_vllm_version

logger = logging.getLogger("xbai_kernels.vllm")

MODEL_CLASSES = {
    "Qwen2ForCausalLM": "xbai_kernels.vllm.model:Qwen2SPRMForCausalLM",
    "Qwen3ForCausalLM": "xbai_kernels.vllm.model:Qwen3SPRMForCausalLM",
    "Qwen2SPRMForCausalLM": "xbai_kernels.vllm.model:Qwen2SPRMForCausalLM",
    "Qwen3SPRMForCausalLM": "xbai_kernels.vllm.model:Qwen3SPRMForCausalLM",
    "Qwen2SPRMRewardModel": "xbai_kernels.vllm.pooling:Qwen2SPRMRewardModel",
    "Qwen3SPRMRewardModel": "xbai_kernels.vllm.pooling:Qwen3SPRMRewardModel",
}
_registered = False

__all__ = ["MODES", "BestOfN", "Candidate", "SUPPORTED_VLLM", "best_of_n", "check_vllm_version", "register"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: idempotent, models registered by string, no CUDA.

    With ``XBAI_SPRM=0`` the model classes are still registered (they load a checkpoint directory
    that holds ``sprm_head.safetensors``, which stock vLLM would try to load as model weights) but
    score nothing, and no vLLM default is changed.
    """
    global _registered
    from . import config, patches

    if _registered:
        return
    import vllm

    scoring = config.enabled_by_environment()
    try:
        check_vllm_version(vllm.__version__)
    except RuntimeError:
        if scoring:
            raise
        return  # XBAI_SPRM=0 on an unsupported vLLM: leave vLLM entirely alone
    from vllm import ModelRegistry

    for architecture, target in MODEL_CLASSES.items():
        ModelRegistry.register_model(architecture, target)
    if scoring:
        from .server import install_server_patch

        patches.apply("scheduler")
        patches.apply("frontend")
        install_server_patch()
    _registered = True
    logger.debug("xbai_kernels: vLLM plugin registered (scoring %s)", "on" if scoring else "off")
