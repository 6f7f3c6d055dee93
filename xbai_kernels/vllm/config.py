"""Where the SPRM head comes from and whether scoring is on, decided the same way in every vLLM process.

The front end, the engine core and the workers each decide on their own (they share no state),
so the decision reads only the model config and the environment:

* ``hf_overrides={"xbai_sprm": False}`` or ``XBAI_SPRM=0`` turns scoring off (the model then runs as
  plain Qwen2/Qwen3);
* ``hf_overrides={"xbai_sprm_head": PATH}`` or ``XBAI_SPRM_HEAD=PATH`` points at a head file or a
  directory holding one; otherwise the model directory's ``sprm_head.safetensors`` or released
  ``score_module.pt`` is used, and a model without either runs unscored;
* ``hf_overrides={"xbai_sprm_lang": "zh"}`` or ``XBAI_SPRM_LANG=zh`` picks SPEC's Chinese step set.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..head import CheckpointError, find_checkpoint

ENV_ENABLE = "XBAI_SPRM"
ENV_HEAD = "XBAI_SPRM_HEAD"
ENV_LANG = "XBAI_SPRM_LANG"
_OFF = ("0", "false", "no", "off")


def enabled_by_environment() -> bool:
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in _OFF


def _override(model_config, name: str):
    hf_config = getattr(model_config, "hf_config", None)
    return getattr(hf_config, name, None) if hf_config is not None else None


def scoring_requested(model_config) -> bool:
    """False when the user turned scoring off for this engine (override first, then environment)."""
    flag = _override(model_config, "xbai_sprm")
    if flag is not None:
        return bool(flag) and str(flag).strip().lower() not in _OFF
    return enabled_by_environment()


def head_location(model_config) -> Path | None:
    """The head checkpoint for this engine, or None when the model has none and none was named.

    A head that was named explicitly (override or ``XBAI_SPRM_HEAD``) but is missing is an error,
    not a silent fallback to unscored serving.
    """
    if not scoring_requested(model_config):
        return None
    named = _override(model_config, "xbai_sprm_head") or os.environ.get(ENV_HEAD, "").strip()
    if named:
        return find_checkpoint(named)
    model_dir = Path(str(model_config.model))
    if not model_dir.is_dir():
        return None
    try:
        return find_checkpoint(model_dir)
    except CheckpointError:
        return None


def step_language(model_config) -> str:
    lang = (_override(model_config, "xbai_sprm_lang") or os.environ.get(ENV_LANG, "en")).strip().lower()
    if lang not in ("en", "zh"):
        raise ValueError(f"{ENV_LANG}/xbai_sprm_lang must be 'en' or 'zh', got {lang!r}")
    return lang
