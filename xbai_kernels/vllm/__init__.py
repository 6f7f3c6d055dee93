"""vLLM integration: SPRM step scores from the same decoding pass, in ``LLM.generate`` and the OpenAI server.

Installing xbai-kernels registers ``register`` as a ``vllm.general_plugins`` entry point, which
vLLM calls in every process it starts. Supported: vLLM 0.32.x (``SUPPORTED_VLLM``), V1 model
runner, no speculative decoding, no pipeline parallelism. Importing this package imports no vLLM
and touches no CUDA; ``register`` imports vLLM modules but initializes no device.

Switches (see ``config``): ``XBAI_SPRM=0`` turns everything off, ``XBAI_SPRM_HEAD=PATH`` points at
a head elsewhere, ``XBAI_SPRM_LANG=zh`` picks the Chinese step set; the same per engine through
``hf_overrides={"xbai_sprm": ..., "xbai_sprm_head": ..., "xbai_sprm_lang": ...}``.
"""

from __future__ import annotations

import logging
import os

from .best_of_n import MODES, BestOfN, Candidate, best_of_n

logger = logging.getLogger("xbai_kernels.vllm")

SUPPORTED_VLLM = ((0, 32), (0, 33))  # [low, high): the 0.32 line
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


def check_vllm_version(version: str) -> None:
    """Raise ``RuntimeError`` unless ``version`` is in the supported range."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError as exc:
        raise RuntimeError(f"xbai_kernels.vllm: cannot parse the vLLM version {version!r}") from exc
    (low, high) = SUPPORTED_VLLM
    if not low <= (major, minor) < high:
        raise RuntimeError(
            f"xbai_kernels.vllm supports vLLM {low[0]}.{low[1]}.x (>= {low[0]}.{low[1]}, < {high[0]}.{high[1]}); "
            f"found vLLM {version}. Install a supported vLLM (pip install 'xbai-kernels[vllm]'), "
            f"or set XBAI_SPRM=0 to run vLLM without the SPRM plugin."
        )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: idempotent, models registered by string, no CUDA.

    With ``XBAI_SPRM=0`` the model classes are still registered (they load a checkpoint directory
    that holds ``sprm_head.safetensors``, which stock vLLM would try to load as model weights) but
    score nothing, and no vLLM default is changed.
    """
    global _registered
    from . import config

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
    if scoring:
        # Scoring hooks the V1 model runner; CUDA builds of 0.32 default to Model Runner V2.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from vllm import ModelRegistry

    for architecture, target in MODEL_CLASSES.items():
        ModelRegistry.register_model(architecture, target)
    if scoring:
        from .engine import patch_scheduler
        from .frontend import patch_output_processor
        from .server import install_server_patch

        patch_scheduler()
        patch_output_processor()
        install_server_patch()
    _registered = True
    logger.debug("xbai_kernels: vLLM plugin registered (scoring %s)", "on" if scoring else "off")
