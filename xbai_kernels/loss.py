"""The SPR training loss: on given logits (``sprm_loss``) and fused with the head (``sprm_head_loss``)."""

from __future__ import annotations

import torch

from ._validate import FLOAT_DTYPES, check_tensor
from .head import DROPOUT_P, SPRMHead
from . import semantics
from .ops import dispatch


def _check_rewards(where: str, rewards, mask_shape: torch.Size, device) -> torch.Tensor:
    check_tensor(where, "rewards", rewards, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), device=device)
    if tuple(rewards.shape) == tuple(mask_shape):
        per_position = rewards
    elif rewards.dim() == 1 and len(mask_shape) >= 1 and rewards.shape[0] == mask_shape[0]:
        per_position = rewards.reshape(rewards.shape + (1,) * (len(mask_shape) - 1))
    else:
        raise ValueError(
            f"{where}: rewards must have shape [{mask_shape[0] if mask_shape else '?'}] (one per sequence) "
            f"or {tuple(mask_shape)} (one per position), got {tuple(rewards.shape)}"
        )
    # Compare in float32, as the released code does, so a reward written as 0.1 always means "ignore".
    return per_position.float()


def sprm_loss(
    logits: torch.Tensor,
    rewards: torch.Tensor,
    step_mask: torch.Tensor | None = None,
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SPR loss on per-position head logits (docs/semantics.md).

    logits float [B, T] (0 at positions that are not steps, as the released code has them),
    rewards float [B] (> 0.5 correct, == 0.1 ignored), step_mask bool [B, T] (default: every
    position). With ``process_group`` (a group, or ``True`` for the default one) the
    positive/negative counts are summed over its ranks. Returns (loss, stats) with stats
    ``num_positive``, ``num_negative`` and ``step_score_geomean`` [B] (the released monitoring
    number: geometric mean of sigmoid over the non-zero logits of each row, 0 for ignored rows).
    """
    check_tensor("sprm_loss", "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if step_mask is None:
        step_mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    check_tensor("sprm_loss", "step_mask", step_mask, dtypes=(torch.bool,), device=logits.device)
    if step_mask.shape != logits.shape:
        raise ValueError(f"sprm_loss: step_mask has shape {tuple(step_mask.shape)}, logits {tuple(logits.shape)}")
    correct, valid = semantics.reward_outcome(_check_rewards("sprm_loss", rewards, logits.shape, logits.device))
    loss, stats = semantics.spr_loss(logits, correct, valid, step_mask, process_group)
    # The released monitor reports 0 for ignored samples (reward 0.1).
    masked = torch.where(step_mask & valid, logits.detach().float(), 0.0)
    stats["step_score_geomean"] = semantics.nonzero_logit_geomean(masked)
    return loss, stats


def sprm_head_loss(
    hidden: torch.Tensor,
    head: SPRMHead,
    step_mask: torch.Tensor,
    rewards: torch.Tensor,
    dropout_p: float = DROPOUT_P,
    backbone_grad_scale: float = 1e-4,
    process_group=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Head forward (with dropout) + SPR loss, differentiable in the head and in ``hidden``.

    hidden [..., d] (``h``; any float dtype), step_mask bool [...] (the training positions),
    rewards float [B] (one per leading row) or [...] (one per position). The gradient reaching
    ``hidden`` is scaled by ``backbone_grad_scale``; the head's own gradients are full.
    Synchronizes once with the host to count the step rows. Returns (loss, stats) as
    ``sprm_loss`` does, plus ``logits`` (float32, same shape as ``step_mask``, 0 off the steps).
    """
    if not isinstance(head, SPRMHead):
        raise TypeError(f"sprm_head_loss: head must be an SPRMHead, got {type(head).__name__}")
    check_tensor("sprm_head_loss", "hidden", hidden, dtypes=FLOAT_DTYPES, device=head[0].weight.device)
    if hidden.dim() < 2 or hidden.shape[-1] != head.hidden_size:
        raise ValueError(
            f"sprm_head_loss: hidden must be [..., {head.hidden_size}], got shape {tuple(hidden.shape)}"
        )
    check_tensor("sprm_head_loss", "step_mask", step_mask, dtypes=(torch.bool,), device=hidden.device)
    if step_mask.shape != hidden.shape[:-1]:
        raise ValueError(
            f"sprm_head_loss: step_mask has shape {tuple(step_mask.shape)}, expected {tuple(hidden.shape[:-1])}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"sprm_head_loss: dropout_p must be in [0, 1), got {dropout_p}")
    per_position = _check_rewards("sprm_head_loss", rewards, step_mask.shape, hidden.device)
    correct, valid = semantics.reward_outcome(per_position.expand(step_mask.shape))

    flat_mask = step_mask.reshape(-1)
    rows = flat_mask.nonzero().squeeze(-1)
    loss, row_logits, stats = dispatch.call(
        "sprm_head_loss",
        hidden.device,
        hidden.reshape(-1, hidden.shape[-1]),
        rows,
        *head.weights,
        correct.reshape(-1)[rows],
        valid.reshape(-1)[rows],
        dropout_p,
        backbone_grad_scale,
        process_group,
        generator,
    )
    logits = torch.zeros(flat_mask.shape, dtype=torch.float32, device=hidden.device)
    logits = logits.index_put((rows,), row_logits.detach().float()).reshape(step_mask.shape)
    stats = dict(stats)
    stats["logits"] = logits
    monitored = torch.where(valid, logits, 0.0).reshape(logits.shape[0], -1)
    stats["step_score_geomean"] = semantics.nonzero_logit_geomean(monitored)
    return loss, stats
