"""An eager restatement of the released XBai o4 verl actor's score path, and verl-layout test batches.

``released_score_loss`` restates ``DataParallelPPOActor._forward_micro_batch_with_score`` of the
released actor (remove-padding path, no sequence parallelism): a forward with
``output_hidden_states=True``, ``hidden_states[-2]`` scaled by ``h * 1e-4 + h.detach() * (1 - 1e-4)``,
the rolled step and response masks, a boolean gather into an ``nn.Sequential`` head, the logits padded
back and sliced to the response, and the eager SPR loss with all-reduced counts. The tests compare
against it and ``benchmarks/bench_train_memory.py`` measures it; it needs no pytest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xbai_kernels.verl import index_first_axis, pad_input, unpad_input

TINY_VOCAB = 515  # the tiny tokenizer's size; ids >= 512 are <think>, </think>, ".\n\n"
STEP_ID = 514
PAD_ID = 0


# ----- the released code, restated ---------------------------------------------------------------


def released_filter_mask(x, correct_mask):
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[(x > 0) & correct_mask] = 1
    mask[(x < 0) & (~correct_mask)] = 1
    return mask


def released_geommean_scores(x, eps=1e-8):
    mask = (x != 0).float()
    masked_x = torch.where(mask.bool(), torch.sigmoid(x), torch.ones_like(x))
    log_x = torch.log(masked_x + eps) * mask
    count = mask.sum(dim=1) + eps
    geom_mean = torch.exp(log_x.sum(dim=1) / count)
    geom_mean[mask.sum(dim=1) == 0] = 0.0
    return geom_mean


@dataclass
class RmpadBatch:
    """A verl micro batch after ``unpad_input``: every field as the released actor has it."""

    input_ids: torch.Tensor  # [1, nnz]
    position_ids: torch.Tensor  # [1, nnz]
    response_mask: torch.Tensor  # [1, nnz], 1 on response tokens (not rolled)
    indices: torch.Tensor  # int64 [nnz]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    batch_size: int
    seqlen: int
    response_length: int


def rmpad(batch: dict) -> RmpadBatch:
    input_ids, attention_mask, position_ids = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    batch_size, seqlen = input_ids.shape
    response_length = batch["response_length"]
    response_masks = torch.cat(
        [torch.zeros_like(input_ids[:, : seqlen - response_length]), torch.ones_like(input_ids[:, :response_length])],
        dim=1,
    )
    input_ids_rmpad, indices, cu_seqlens, _ = unpad_input(input_ids.unsqueeze(-1), attention_mask)
    response_rmpad, *_ = unpad_input(response_masks.unsqueeze(-1), attention_mask)
    position_ids_rmpad = index_first_axis(position_ids.reshape(-1, 1), indices).transpose(0, 1)
    return RmpadBatch(
        input_ids_rmpad.transpose(0, 1),
        position_ids_rmpad,
        response_rmpad.transpose(0, 1),
        indices,
        cu_seqlens,
        batch_size,
        seqlen,
        response_length,
    )


def released_forward(model, rm: RmpadBatch, **kwargs):
    """The released actor's forward on the packed row (``kwargs``: e.g. ``logits_to_keep``)."""
    return model(
        input_ids=rm.input_ids, attention_mask=None, position_ids=rm.position_ids, use_cache=False,
        output_hidden_states=True, **kwargs,
    )


def packed_hidden(model, rm: RmpadBatch) -> torch.Tensor:
    """``h`` of every token of the packed row, [nnz, d]: what verl's actor hands its score path."""
    return released_forward(model, rm).hidden_states[-2][0]


def released_score_loss(model, batch: dict, reward, score_module, score_id, all_reduce: bool = False):
    """The released score path. Returns (loss, (correct_prob, correct_num, false_prob, false_num),
    score_probs [B, response_length], mean_prob [B])."""
    rm = rmpad(batch)
    return released_score_path(released_forward(model, rm), rm, reward, score_module, score_id, all_reduce)


def released_score_path(output, rm: RmpadBatch, reward, score_module, score_id, all_reduce: bool = False):
    """Everything the released actor does with ``output.hidden_states`` to get the score loss."""
    batch_size, seqlen, response_length = rm.batch_size, rm.seqlen, rm.response_length
    score_mask_rmpad = rm.input_ids == score_id
    score_mask_rmpad_rolled = torch.roll(score_mask_rmpad, shifts=-1, dims=1)
    response_masks_rmpad_rolled = torch.roll(rm.response_mask, shifts=-1, dims=1)
    output_features = output.hidden_states[-2][0]
    output_features = output_features * 0.0001 + output_features.detach() * (1 - 0.0001)
    score_loss_mask = (score_mask_rmpad_rolled == 1) & (response_masks_rmpad_rolled == 1)
    if not score_loss_mask.any():
        score_probs = score_module(output_features[:1])
        return score_probs.sum() * 0.0, (0, 0, 0, 0), None, None
    score_probs = torch.zeros_like(output_features[:, 0])
    score_features = output_features[score_loss_mask[0]]
    score_probs[score_loss_mask[0]] = score_module(score_features).squeeze(1)
    score_probs = pad_input(score_probs.unsqueeze(-1), rm.indices, batch_size, seqlen)
    score_probs = score_probs.squeeze(2)[:, -response_length - 1 : -1]
    correct_mask = reward.unsqueeze(1).expand((batch_size, response_length)) > 0.5
    rank_mask = released_filter_mask(score_probs, correct_mask)
    score_loss = nn.BCEWithLogitsLoss(reduction="none")(score_probs, correct_mask.float())
    valid_mask = (reward.unsqueeze(1).expand((batch_size, response_length)) != 0.1).float()
    final_mask = valid_mask * rank_mask
    pos_mask = final_mask * correct_mask.float()
    neg_mask = final_mask * (1 - correct_mask.float())
    pos_count = pos_mask.sum()
    neg_count = neg_mask.sum()
    if all_reduce:
        import torch.distributed as dist

        dist.all_reduce(pos_count, op=dist.ReduceOp.SUM)
        dist.all_reduce(neg_count, op=dist.ReduceOp.SUM)
    total = pos_count + neg_count + 1e-5
    neg_weight = pos_count / total
    pos_weight = 1.5 * neg_count / total
    weights = pos_mask * pos_weight + neg_mask * neg_weight
    score_loss_mean = (score_loss * weights).sum() / (weights.sum() + 1e-5)
    with torch.no_grad():
        mean_prob = released_geommean_scores(score_probs * valid_mask)
        metrics = (
            mean_prob[reward > 0.5].sum().item(),
            (reward > 0.5).sum().item(),
            mean_prob[reward == 0].sum().item(),
            (reward == 0).sum().item(),
        )
    return score_loss_mean, metrics, score_probs, mean_prob


# ----- test data ---------------------------------------------------------------------------------


def verl_batch(
    seed: int, prompt_lengths, response_lengths, prompt_width=7, response_width=12, step_rate=0.25,
    vocab_size: int = TINY_VOCAB, step_id: int = STEP_ID,
):
    """A verl micro batch: left-padded prompts, right-padded responses, position ids from the mask.

    Tokens are random ids of the tiny vocabulary with the step id at ``step_rate``, also inside
    prompts (which are never trained) and in runs (all trained: no first-of-run in training).
    """
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(prompt_lengths)
    seqlen = prompt_width + response_width
    input_ids = torch.full((batch_size, seqlen), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, seqlen), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        tokens = torch.randint(1, vocab_size - 3, (p + r,), generator=generator)
        steps = torch.rand(p + r, generator=generator) < step_rate
        tokens[steps] = step_id
        input_ids[b, prompt_width - p : prompt_width + r] = tokens
        attention_mask[b, prompt_width - p : prompt_width + r] = 1
    position_ids = torch.clip(torch.cumsum(attention_mask, dim=-1) - 1, min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_length": response_width,
    }


def standard_batch(seed: int = 0) -> dict:
    batch = verl_batch(seed, prompt_lengths=(7, 3, 5, 4, 6), response_lengths=(12, 9, 5, 11, 7))
    # Row 1's response opens with a step: its trained position is the last prompt token.
    batch["input_ids"][1, 7] = STEP_ID
    # Row 2 has no step in its response; row 3 has a run of three.
    batch["input_ids"][2, 7:12] = torch.tensor([5, 6, 7, 8, 9])
    batch["input_ids"][3, 9:12] = STEP_ID
    return batch


STANDARD_REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.1])


def tiny_model(seed: int = 0, arch: str = "qwen3"):
    from transformers import AutoModelForCausalLM

    from xbai_kernels.tiny import build_config

    config = build_config(arch, TINY_VOCAB, PAD_ID)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def released_head(model, batch: dict, seed: int = 1) -> nn.Sequential:
    """The released ``nn.Sequential`` head, its output bias centred on this batch's step logits so
    that both outcomes keep positions through the self-supervised filter (a non-trivial loss)."""
    d = model.config.hidden_size
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * d, 1)).eval()
    rm = rmpad(batch)
    with torch.no_grad():
        h = model(
            input_ids=rm.input_ids, position_ids=rm.position_ids, use_cache=False, output_hidden_states=True
        ).hidden_states[-2][0]
        logits = head(h).squeeze(-1)
        head[3].bias -= logits.median()
    return head


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(ours: dict, released: dict, rtol: float = 1e-4) -> None:
    assert ours.keys() == released.keys(), (sorted(ours), sorted(released))
    for name, expected in released.items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(ours[name], expected, rtol=rtol, atol=rtol * scale + 1e-12, msg=name)
