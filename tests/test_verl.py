"""xbai_kernels.verl.sprm_score_loss against the eager restatement of the released XBai o4 verl actor
(tests/released_actor.py)."""

from __future__ import annotations

import pytest
import torch
from released_actor import (
    STANDARD_REWARDS,
    STEP_ID,
    assert_grads_close,
    grads,
    packed_hidden,
    released_head,
    released_score_loss,
    rmpad,
    standard_batch,
    tiny_model,
)
from torch import nn

from xbai_kernels import SPRMHead
from xbai_kernels.training import next_token_step_mask
from xbai_kernels.verl import (
    RELEASED_METRICS,
    as_sprm_head,
    pad_input,
    released_metrics,
    sprm_score_loss,
    unpad_input,
)

# ----- tests -------------------------------------------------------------------------------------


def test_rmpad_helpers_round_trip():
    batch = standard_batch()
    values = torch.randn(batch["input_ids"].shape + (3,))
    rows, indices, cu_seqlens, max_seqlen = unpad_input(values, batch["attention_mask"])
    assert torch.equal(indices, batch["attention_mask"].flatten().nonzero().flatten())
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist()[-1] == rows.shape[0]
    assert max_seqlen == int(batch["attention_mask"].sum(-1).max())
    padded = pad_input(rows, indices, *batch["input_ids"].shape)
    torch.testing.assert_close(padded, values * batch["attention_mask"].unsqueeze(-1))


def test_next_token_step_mask_rule():
    ids = torch.tensor([[1, 9, 9, 2, 9, 3, 9]])
    response = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    same = torch.tensor([[1, 1, 1, 0, 1, 1, 1]])
    mask = next_token_step_mask(ids, 9, response, same)
    # t=0: the next token is a response step (t itself is prompt); t=1: a run trains every step;
    # t=3: its next token belongs to another sequence; t=5: trained; t=6: no next token.
    assert mask.tolist() == [[True, True, False, False, False, True, False]]
    assert next_token_step_mask(ids, 9, None, None).tolist() == [[True, True, False, True, False, True, False]]
    assert not next_token_step_mask(ids, 9, torch.zeros_like(ids), None).any()


@pytest.mark.parametrize("head_kind", ["released_sequential", "sprm_head"])
def test_matches_released_loss_grads_and_monitoring(head_kind):
    batch = standard_batch()
    model = tiny_model()
    reference_head = released_head(model, batch)
    loss_ref, metrics_ref, probs_ref, mean_ref = released_score_loss(model, batch, STANDARD_REWARDS, reference_head, STEP_ID)
    loss_ref.backward()
    head_grads_ref, backbone_grads_ref = grads(reference_head), grads(model)
    model.zero_grad(set_to_none=True)

    if head_kind == "sprm_head":
        head = SPRMHead(model.config.hidden_size).eval()
        head.load_state_dict(reference_head.state_dict())
    else:
        head = torch.nn.Sequential(*[m for m in released_head(model, batch)]).eval()
    rm = rmpad(batch)
    out = model(input_ids=rm.input_ids, position_ids=rm.position_ids, use_cache=False, output_hidden_states=True)
    loss, stats = sprm_score_loss(
        out.hidden_states[-2][0], rm.input_ids, rm.response_mask, STANDARD_REWARDS, rm.indices,
        rm.batch_size, rm.seqlen, head, STEP_ID,
    )
    loss.backward()

    assert stats["num_positive"] > 0 and stats["num_negative"] > 0, "the comparison needs a non-trivial loss"
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["logits"][:, -rm.response_length - 1 : -1], probs_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["step_score_geomean"], mean_ref, rtol=1e-5, atol=1e-6)
    ours = released_metrics(stats)
    assert ours[1] == metrics_ref[1] and ours[3] == metrics_ref[3]
    assert ours[0] == pytest.approx(metrics_ref[0], rel=1e-5) and ours[2] == pytest.approx(metrics_ref[2], rel=1e-5)
    assert_grads_close(grads(head), head_grads_ref, rtol=1e-4)
    assert_grads_close(grads(model), backbone_grads_ref, rtol=1e-4)


def test_no_step_anywhere_gives_zero_loss_and_the_released_zero_metrics():
    batch = standard_batch()
    batch["input_ids"][batch["input_ids"] == STEP_ID] = 5
    model = tiny_model()
    head = SPRMHead(model.config.hidden_size).eval()
    rm = rmpad(batch)
    hidden = packed_hidden(model, rm)
    loss, stats = sprm_score_loss(
        hidden, rm.input_ids, rm.response_mask, STANDARD_REWARDS, rm.indices, rm.batch_size, rm.seqlen, head, STEP_ID
    )
    loss.backward()
    assert loss.item() == 0.0
    assert released_metrics(stats) == (0.0, 0, 0.0, 0)
    # Every head parameter still takes part in the graph (DDP/FSDP need a gradient for each).
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())


def test_dropout_follows_the_head_mode():
    batch = standard_batch()
    model = tiny_model()
    head = released_head(model, batch)
    rm = rmpad(batch)
    with torch.no_grad():
        hidden = packed_hidden(model, rm)
    args = (hidden, rm.input_ids, rm.response_mask, STANDARD_REWARDS, rm.indices, rm.batch_size, rm.seqlen)
    _, eval_stats = sprm_score_loss(*args, head.eval(), STEP_ID)
    _, train_stats = sprm_score_loss(*args, head.train(), STEP_ID, generator=torch.Generator().manual_seed(0))
    _, forced_off = sprm_score_loss(*args, head.train(), STEP_ID, dropout_p=0.0)
    steps = eval_stats["logits"] != 0
    assert not torch.allclose(train_stats["logits"][steps], eval_stats["logits"][steps])
    torch.testing.assert_close(forced_off["logits"], eval_stats["logits"])


def test_as_sprm_head_shares_parameters_and_rejects_other_modules():
    sequential = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    head = as_sprm_head(sequential)
    assert head[0].weight is sequential[0].weight and head[3].bias is sequential[3].bias
    assert as_sprm_head(head) is head
    with pytest.raises(TypeError, match="nn.Sequential"):
        as_sprm_head(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
    with pytest.raises(TypeError):
        as_sprm_head(nn.Linear(8, 1))


def test_input_errors_are_readable():
    batch = standard_batch()
    rm = rmpad(batch)
    hidden = torch.randn(rm.input_ids.shape[1], 128)
    head = SPRMHead(128)
    good = dict(
        output_features=hidden, input_ids_rmpad=rm.input_ids, response_mask_rmpad=rm.response_mask,
        rewards=STANDARD_REWARDS, indices=rm.indices, batch_size=rm.batch_size, seqlen=rm.seqlen, head=head,
        step_token_id=STEP_ID,
    )
    sprm_score_loss(**good)
    with pytest.raises(ValueError, match="rewards has 4 entries"):
        sprm_score_loss(**{**good, "rewards": STANDARD_REWARDS[:4]})
    with pytest.raises(ValueError, match="input_ids_rmpad has"):
        sprm_score_loss(**{**good, "input_ids_rmpad": rm.input_ids[:, :-1]})
    with pytest.raises(TypeError, match="input_ids_rmpad must have dtype"):
        sprm_score_loss(**{**good, "input_ids_rmpad": rm.input_ids.float()})
    with pytest.raises(ValueError, match="seqlen must be a positive int"):
        sprm_score_loss(**{**good, "seqlen": 0})
    with pytest.raises(ValueError, match="hidden must be"):
        sprm_score_loss(**{**good, "output_features": hidden[:, :64]})
    assert RELEASED_METRICS == ("correct_prob", "correct_num", "false_prob", "false_num")


def test_head_and_loss_stay_float32_under_bf16_autocast():
    # The released actor runs its forward under bf16 autocast; the head must still accumulate in fp32.
    batch = standard_batch()
    model = tiny_model()
    head = released_head(model, batch)
    rm = rmpad(batch)
    with torch.no_grad():
        hidden = packed_hidden(model, rm)
    args = (hidden, rm.input_ids, rm.response_mask, STANDARD_REWARDS, rm.indices, rm.batch_size, rm.seqlen, head, STEP_ID)
    expected, expected_stats = sprm_score_loss(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = sprm_score_loss(*args)
    assert stats["logits"].dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["logits"], expected_stats["logits"])
