"""The score path of the released verl actor as one call, on verl's "remove padding" layout.

The released XBai o4 actor (``DataParallelPPOActor._forward_micro_batch_with_score``) runs the
backbone with ``output_hidden_states=True``, scales every row of ``hidden_states[-2]`` by
``h * 1e-4 + h.detach() * (1 - 1e-4)``, gathers the step rows with a boolean index, runs an eager
``nn.Sequential`` head, pads the logits back to ``[batch, seqlen]`` and computes the SPR loss
with all-reduced counts and a per-sequence monitoring geometric mean. ``sprm_score_loss`` takes the
inputs that code has at that point and returns the same loss and monitoring numbers through
``xbai_kernels.sprm_head_loss`` (the fused op). ``python/verl_actor_patch.md`` shows the patch.

verl need not be installed: its padding helpers (flash-attn's ``bert_padding``) are restated here.
The packed core, ``xbai_kernels.training.sequence_spr_loss``, is shared with the HuggingFace patch
(``xbai_kernels.transformers``), which flattens a padded or packed batch into it.
"""

from __future__ import annotations

import torch
from torch import nn

from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from .head import SPRMHead
from .training import next_token_step_mask, sequence_spr_loss

RELEASED_METRICS = ("correct_prob", "correct_num", "false_prob", "false_num")

# ----- verl's padding helpers (flash_attn.bert_padding), restated --------------------------------


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor):
    """[B, S, ...] and a [B, S] 0/1 mask -> (rows [nnz, ...], indices int64 [nnz], cu_seqlens int32 [B+1], max_seqlen).

    ``indices`` are the positions of the kept tokens in the flattened ``[B * S]`` batch, in order.
    """
    check_tensor("unpad_input", "attention_mask", attention_mask, ndim=2, device=hidden_states.device)
    if tuple(hidden_states.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(
            f"unpad_input: hidden_states starts with {tuple(hidden_states.shape[:2])}, "
            f"attention_mask is {tuple(attention_mask.shape)}"
        )
    lengths = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape((-1,) + tuple(hidden_states.shape[2:]))
    return index_first_axis(flat, indices), indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def index_first_axis(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor[indices]`` along the first axis (differentiable)."""
    return tensor.index_select(0, indices)


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of ``unpad_input``: rows [nnz, ...] -> [batch, seqlen, ...] with zeros at padding (differentiable)."""
    out = hidden_states.new_zeros((batch * seqlen,) + tuple(hidden_states.shape[1:]))
    out = out.index_put((indices,), hidden_states)
    return out.reshape((batch, seqlen) + tuple(hidden_states.shape[1:]))


# ----- the packed core ---------------------------------------------------------------------------


def as_sprm_head(module: nn.Module) -> SPRMHead:
    """An ``SPRMHead`` over the parameters of ``module``.

    ``module`` is an ``SPRMHead``, or the released ``nn.Sequential(Linear(d, 2d), ReLU, Dropout,
    Linear(2d, 1))`` (the verl ``score_module``): the returned head shares its ``Linear`` and
    ``Dropout`` modules, so gradients land in the caller's parameters and its optimizer sees them.
    A head wrapped by FSDP must be unwrapped (or its parameters gathered) first.
    """
    if isinstance(module, SPRMHead):
        return module
    layout_ok = (
        isinstance(module, nn.Sequential)
        and len(module) == 4
        and isinstance(module[0], nn.Linear)
        and isinstance(module[1], nn.ReLU)
        and isinstance(module[2], nn.Dropout)
        and isinstance(module[3], nn.Linear)
        and module[0].out_features == 2 * module[0].in_features
        and module[3].in_features == module[0].out_features
        and module[3].out_features == 1
        and module[0].bias is not None
        and module[3].bias is not None
    )
    if not layout_ok:
        raise TypeError(
            "the SPRM head must be an SPRMHead or the released nn.Sequential(Linear(d, 2d), ReLU, Dropout, "
            f"Linear(2d, 1)) with biases, got {module.__class__.__name__}: {module}"
        )
    head = SPRMHead(module[0].in_features, device="meta")
    for index in range(4):
        head[index] = module[index]
    head.train(module.training)
    return head


def sprm_score_loss(
    output_features: torch.Tensor,
    input_ids_rmpad: torch.Tensor,
    response_mask_rmpad: torch.Tensor,
    rewards: torch.Tensor,
    indices: torch.Tensor,
    batch_size: int,
    seqlen: int,
    head: nn.Module,
    step_token_id: int,
    **loss_options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The released actor's score loss on the remove-padding layout, as one call.

    output_features [nnz, d] or [1, nnz, d]: ``h`` of every kept token, UNSCALED (the released
    ``output.hidden_states[-2][0]``, or the tensor ``xbai_kernels.transformers`` captures; the
    ``1e-4`` backbone scale is applied here, to the step rows only). input_ids_rmpad and
    response_mask_rmpad [1, nnz] or [nnz] (unrolled: 1 on response tokens), rewards float [batch]
    (the released ``rollout_level_scores.max(dim=1)[0]``), indices int64 [nnz] (from ``unpad_input``),
    head an ``SPRMHead`` or the released ``nn.Sequential`` score module, step_token_id the first id
    of ``".\\n\\n"``. ``loss_options`` go to ``training.sequence_spr_loss`` as they are: ``dropout_p``
    (default None: the head's dropout in training mode, none in eval mode), ``backbone_grad_scale``
    (default 1e-4), ``process_group`` (default ``"auto"``: the counts are all-reduced over the default
    group when one is initialized) and ``generator`` (the dropout's).

    Returns (loss, stats): stats as ``sequence_spr_loss`` (per-sequence ``step_score_geomean``
    [batch], the four released monitoring numbers, listed in ``RELEASED_METRICS``, as 0-d tensors)
    with ``logits`` padded back to float32 [batch, seqlen] as the released ``score_probs``.
    """
    where = "sprm_score_loss"
    if output_features.dim() == 3 and output_features.shape[0] == 1:
        output_features = output_features[0]
    check_tensor(where, "output_features", output_features, ndim=2, dtypes=FLOAT_DTYPES)
    device = output_features.device
    nnz = output_features.shape[0]
    input_ids = _flat_tokens(where, "input_ids_rmpad", input_ids_rmpad, nnz, device, INDEX_DTYPES)
    response = _flat_tokens(where, "response_mask_rmpad", response_mask_rmpad, nnz, device, None)
    check_tensor(where, "indices", indices, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if indices.shape[0] != nnz:
        raise ValueError(f"{where}: indices has {indices.shape[0]} entries, output_features {nnz} rows")
    for name, value in (("batch_size", batch_size), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    check_tensor(where, "rewards", rewards, ndim=1, device=device)
    if rewards.shape[0] != batch_size:
        raise ValueError(f"{where}: rewards has {rewards.shape[0]} entries, batch_size is {batch_size}")
    head = as_sprm_head(head)

    sequence_index = torch.div(indices.long(), seqlen, rounding_mode="floor")
    # unpad_input keeps tokens in order, so a row boundary lies between neighbours whose rows differ.
    same_sequence_as_next = torch.nn.functional.pad(sequence_index[1:] == sequence_index[:-1], (0, 1), value=False)
    step_mask = next_token_step_mask(input_ids, step_token_id, response, same_sequence_as_next)
    loss, stats = sequence_spr_loss(
        output_features,
        step_mask,
        sequence_index,
        rewards,
        head,
        **loss_options,
    )
    stats["logits"] = pad_input(stats["logits"], indices.long(), batch_size, seqlen)
    return loss, stats


def released_metrics(stats: dict[str, torch.Tensor]) -> tuple[float, int, float, int]:
    """The released ``(correct_prob, correct_num, false_prob, false_num)`` as Python numbers (synchronizes)."""
    values = torch.stack([stats[name].float() for name in RELEASED_METRICS]).tolist()
    return values[0], int(values[1]), values[2], int(values[3])


def _flat_tokens(where, name, value, nnz, device, dtypes):
    check_tensor(where, name, value, ndim=(1, 2), dtypes=dtypes, device=device)
    if value.dim() == 2:
        if value.shape[0] != 1:
            raise ValueError(f"{where}: {name} must be [1, nnz] or [nnz], got shape {tuple(value.shape)}")
        value = value[0]
    if value.shape[0] != nnz:
        raise ValueError(f"{where}: {name} has {value.shape[0]} tokens, output_features {nnz} rows")
    return value
