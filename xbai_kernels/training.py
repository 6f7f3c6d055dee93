"""The training rule and SPR loss over packed tokens: the core shared by the HuggingFace patch
(``xbai_kernels.transformers``) and the verl one-call (``xbai_kernels.verl``).

Both integrations flatten their batch (padded, or packed sequences in one row) into tokens with a
sequence index, find the training positions with ``next_token_step_mask`` and call
``sequence_spr_loss``, which runs the fused ``sprm_head_loss`` and adds the released actor's
monitoring numbers.
"""

from __future__ import annotations

import torch

from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from .head import SPRMHead
from .loss import sprm_head_loss
from . import semantics

# The released actor scales the gradient reaching the backbone through h by this factor.
BACKBONE_GRAD_SCALE = 1e-4
# The released monitor counts a sequence as wrong only when its reward is exactly 0
# (an ignored sample, reward 0.1, is neither correct nor wrong).
WRONG_REWARD = 0.0


def next_token_step_mask(
    input_ids: torch.Tensor,
    step_token_id: int,
    next_is_response: torch.Tensor | None,
    same_sequence_as_next: torch.Tensor | None,
) -> torch.Tensor:
    """The training positions along the last axis: bool, same shape as ``input_ids``.

    Position t is trained when token t+1 is the step id, token t+1 is a response token
    (``next_is_response[..., t+1]``, the released actor tests the response mask of the NEXT token)
    and t and t+1 belong to one sequence (``same_sequence_as_next[..., t]``): the next-token test
    never crosses a sequence boundary of a packed row. No first-of-run, no thinking-region filter.
    """
    nxt = input_ids[..., 1:] == step_token_id
    if next_is_response is not None:
        nxt = nxt & next_is_response[..., 1:].bool()
    if same_sequence_as_next is not None:
        nxt = nxt & same_sequence_as_next[..., :-1].bool()
    # The last position of a row has no next token.
    return torch.nn.functional.pad(nxt, (0, 1), value=False)


def head_dropout_p(head: SPRMHead) -> float:
    """The head's own dropout (p = 0.5 between ReLU and W2) when it is in training mode, else 0."""
    return float(head[2].p) if head.training else 0.0


def resolve_process_group(process_group):
    """``"auto"``: the default group when torch.distributed is initialized (the released actor always
    all-reduces the counts), else none. Anything else is passed on (a group, ``True`` or ``None``)."""
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be a ProcessGroup, True, None or 'auto', got {process_group!r}")
        import torch.distributed as dist

        return True if dist.is_available() and dist.is_initialized() else None
    return process_group


def sequence_spr_loss(
    hidden: torch.Tensor,
    step_mask: torch.Tensor,
    sequence_index: torch.Tensor,
    rewards: torch.Tensor,
    head: SPRMHead,
    *,
    dropout_p: float | None = None,
    backbone_grad_scale: float = BACKBONE_GRAD_SCALE,
    process_group="auto",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPR loss and the released monitoring numbers over tokens grouped into S sequences.

    hidden [N, d] (``h`` of every token, any float dtype), step_mask bool [N] (the training
    positions), sequence_index int64 [N] in [0, S) (the sequence of each token), rewards float [S].
    ``dropout_p=None`` uses the head's dropout when it is in training mode. Returns (loss, stats):
    ``num_positive``/``num_negative`` (counts summed over ``process_group``), ``logits`` float32 [N]
    (0 off the steps), ``step_score_geomean`` float32 [S] (geometric mean of sigmoid over the
    non-zero logits of each valid sequence, 0 otherwise) and the released actor's monitoring sums
    ``correct_prob``/``correct_num`` (reward > 0.5) and ``false_prob``/``false_num`` (reward == 0),
    all tensors (no host synchronization beyond the one of ``sprm_head_loss``).
    """
    check_tensor("sequence_spr_loss", "hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    num_tokens = hidden.shape[0]
    check_tensor("sequence_spr_loss", "step_mask", step_mask, ndim=1, dtypes=(torch.bool,), device=hidden.device)
    check_tensor("sequence_spr_loss", "sequence_index", sequence_index, ndim=1, dtypes=INDEX_DTYPES, device=hidden.device)
    check_tensor("sequence_spr_loss", "rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), device=hidden.device)
    if step_mask.shape[0] != num_tokens or sequence_index.shape[0] != num_tokens:
        raise ValueError(
            f"sequence_spr_loss: hidden has {num_tokens} rows, step_mask {step_mask.shape[0]}, "
            f"sequence_index {sequence_index.shape[0]}"
        )
    num_sequences = rewards.shape[0]
    sequence_index = sequence_index.long()
    if num_tokens:
        # One small synchronization (the fused op has one anyway): an out-of-range index would
        # otherwise surface as a device-side assert.
        low, high = torch.stack([sequence_index.min(), sequence_index.max()]).tolist()
        if low < 0 or high >= num_sequences:
            raise ValueError(
                f"sequence_spr_loss: sequence_index spans [{low}, {high}] but there are {num_sequences} rewards"
            )
    if dropout_p is None:
        dropout_p = head_dropout_p(head)

    rewards = rewards.float()
    # The released actor runs under bf16 autocast; the head and loss accumulate in fp32 regardless
    # (DESIGN), and autocast would otherwise round the head's matmuls to bf16.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        loss, stats = sprm_head_loss(
            hidden,
            head,
            step_mask,
            rewards[sequence_index],
            dropout_p=dropout_p,
            backbone_grad_scale=backbone_grad_scale,
            process_group=resolve_process_group(process_group),
            generator=generator,
        )
    logits = stats["logits"]
    correct, valid = semantics.reward_outcome(rewards)
    # The released monitor averages over the non-zero logits of valid sequences; every other token
    # goes to an extra segment that is dropped.
    monitored = (logits != 0) & valid[sequence_index]
    segment = torch.where(monitored, sequence_index, num_sequences)
    geomean = semantics.segment_geomean(torch.sigmoid(logits), segment, num_sequences + 1)[:num_sequences]

    wrong = rewards == WRONG_REWARD
    # The released actor reports all four as 0 when no position of this rank is a step.
    any_step = step_mask.any().float()
    return loss, {
        "num_positive": stats["num_positive"],
        "num_negative": stats["num_negative"],
        "logits": logits,
        "step_score_geomean": geomean,
        "correct_prob": (geomean * correct).sum(),
        "correct_num": correct.sum().float() * any_step,
        "false_prob": (geomean * wrong).sum(),
        "false_num": wrong.sum().float() * any_step,
    }
