"""apply_sprm on the tiny model against the eager restatement of the released actor (tests/test_verl.py).

Loss, monitoring numbers and gradients (head parameters, and the backbone through the 1e-4 scaled
path) must match, padded and packed, with gradient checkpointing, in 1 and 2 processes (gloo).
The head's dropout is off for the comparisons (its random stream differs from nn.Dropout's).
"""

from __future__ import annotations

import copy
import datetime
import inspect
import socket

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

from xbai_kernels import SPRMHead, StepRule
from xbai_kernels.transformers import (
    ABSENT,
    HEAD_ATTRIBUTE,
    STATE_ATTRIBUTE,
    apply_sprm,
    is_patched,
    revert_sprm,
)
from xbai_kernels.verl import released_metrics, sprm_score_loss


def response_masks(batch: dict) -> torch.Tensor:
    """The released actor's response mask: 1 on the last ``response_length`` columns."""
    mask = torch.zeros_like(batch["input_ids"])
    mask[:, -batch["response_length"] :] = 1
    return mask


def patched_copy(model, reference_head) -> torch.nn.Module:
    ours = copy.deepcopy(model)
    head = SPRMHead(model.config.hidden_size).eval()
    head.load_state_dict(reference_head.state_dict())
    apply_sprm(ours, head=head, rule=STEP_ID)
    return ours


def run_layout(model, batch: dict, rewards: torch.Tensor, layout: str):
    """One forward of the patched model on ``batch`` laid out as ``layout``; returns the output."""
    if layout == "padded":
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
            sprm_rewards=rewards, sprm_response_mask=response_masks(batch),
        )
    rm = rmpad(batch)
    extra = {"sprm_cu_seqlens": rm.cu_seqlens} if layout == "packed_cu_seqlens" else {}
    return model(
        input_ids=rm.input_ids, position_ids=rm.position_ids, sprm_rewards=rewards,
        sprm_response_mask=rm.response_mask, **extra,
    )


def padded_logits(out, batch: dict, layout: str) -> torch.Tensor:
    """The patched model's logits as the released [B, response_length] ``score_probs``."""
    logits = out.sprm_stats["logits"]
    if layout != "padded":
        from xbai_kernels.verl import pad_input

        rm = rmpad(batch)
        logits = pad_input(logits[0], rm.indices, rm.batch_size, rm.seqlen)
    return logits[:, -batch["response_length"] - 1 : -1]


def compare_to_released(model, batch, rewards, layout, all_reduce=False, rtol=1e-4, head_batch=None):
    # Under data parallelism every rank must start from the same head: centre it on the full batch.
    reference_head = released_head(model, batch if head_batch is None else head_batch)
    ours = patched_copy(model, reference_head)
    loss_ref, metrics_ref, probs_ref, mean_ref = released_score_loss(
        model, batch, rewards, reference_head, STEP_ID, all_reduce=all_reduce
    )
    loss_ref.backward()
    out = run_layout(ours, batch, rewards, layout)
    out.sprm_loss.backward()

    stats = out.sprm_stats
    assert stats["num_positive"] > 0 and stats["num_negative"] > 0, "the comparison needs a non-trivial loss"
    torch.testing.assert_close(out.sprm_loss, loss_ref, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(padded_logits(out, batch, layout), probs_ref.detach(), rtol=rtol, atol=1e-5)
    torch.testing.assert_close(stats["step_score_geomean"], mean_ref, rtol=rtol, atol=1e-6)
    ours_metrics = released_metrics(stats)
    assert ours_metrics[1::2] == tuple(metrics_ref[1::2])
    assert ours_metrics[0::2] == pytest.approx(metrics_ref[0::2], rel=rtol, abs=1e-6)
    assert_grads_close(grads(getattr(ours, HEAD_ATTRIBUTE)), grads(reference_head), rtol=rtol)
    backbone = {name: g for name, g in grads(ours).items() if not name.startswith(HEAD_ATTRIBUTE + ".")}
    assert_grads_close(backbone, grads(model), rtol=rtol)
    return out


# ----- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "packed_position_ids", "packed_cu_seqlens"])
def test_matches_released(layout):
    # Padded runs attention with a padding mask, the released code a packed row: only rounding differs.
    compare_to_released(tiny_model(), standard_batch(), STANDARD_REWARDS, layout, rtol=1e-4 if layout == "padded" else 1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_matches_released_other_seed_and_arch(arch):
    batch = standard_batch(seed=3)
    compare_to_released(tiny_model(seed=2, arch=arch), batch, torch.tensor([0.0, 1.0, 0.1, 1.0, 0.0]), "padded")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(use_reentrant):
    batch = standard_batch()
    model = tiny_model()
    reference_head = released_head(model, batch)
    plain = patched_copy(model, reference_head)
    checkpointed = patched_copy(model, reference_head)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed.train()
    getattr(checkpointed, HEAD_ATTRIBUTE).eval()  # dropout off for the comparison

    expected = run_layout(plain, batch, STANDARD_REWARDS, "padded")
    expected.sprm_loss.backward()
    got = run_layout(checkpointed, batch, STANDARD_REWARDS, "padded")
    got.sprm_loss.backward()
    assert checkpointed.model.layers[-1].gradient_checkpointing
    torch.testing.assert_close(got.sprm_loss, expected.sprm_loss)
    assert_grads_close(grads(checkpointed), grads(plain), rtol=1e-5)
    # The recompute during backward captured nothing.
    assert checkpointed.__dict__[STATE_ATTRIBUTE].hidden is None


def test_head_dropout_is_active_in_training_mode():
    batch = standard_batch()
    model = tiny_model()
    ours = patched_copy(model, released_head(model, batch))
    with torch.no_grad():
        eval_logits = run_layout(ours, batch, STANDARD_REWARDS, "padded").sprm_stats["logits"]
        ours.train()
        train_logits = run_layout(ours, batch, STANDARD_REWARDS, "padded").sprm_stats["logits"]
    # The trained positions: the token before each step token of the response. (Not eval_logits != 0:
    # released_head centres the output bias on the batch's median logit, so a step can score exactly 0.)
    ids, response = batch["input_ids"], response_masks(batch).bool()
    steps = torch.zeros_like(response)
    steps[:, :-1] = (ids[:, 1:] == STEP_ID) & response[:, 1:]
    assert steps.any()
    assert (eval_logits[~steps] == 0).all() and (train_logits[~steps] == 0).all()
    assert not torch.allclose(train_logits[steps], eval_logits[steps])


def test_packed_next_token_test_does_not_cross_sequences():
    model = tiny_model()
    # Two packed sequences: the first ends right before the second starts with a step token.
    input_ids = torch.tensor([[5, 6, 7, STEP_ID, 8, STEP_ID, 9]])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    apply_sprm(model, rule=STEP_ID)
    # Sequence 0 = tokens 0..3 (its step at t=3 is trained from t=2); sequence 1 = tokens 4..6.
    shifted = torch.tensor([[5, 6, 7, 8, STEP_ID, STEP_ID, 9]])
    for ids, expected in ((input_ids, [2, 4]), (shifted, [4])):
        out = model(input_ids=ids, position_ids=position_ids, sprm_rewards=torch.tensor([1.0, 0.0]))
        trained = (out.sprm_stats["logits"][0] != 0).nonzero().flatten().tolist()
        assert trained == expected, (ids.tolist(), trained)


# ----- the patch itself --------------------------------------------------------------------------


def test_apply_returns_what_it_replaced_and_revert_undoes_exactly():
    model = tiny_model()
    batch = standard_batch()
    before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    class_forward = type(model).forward
    layer = model.model.layers[-1]
    patches = apply_sprm(model, rule=StepRule((STEP_ID,), 512, 513))
    assert is_patched(model)
    assert [p.name for p in patches] == ["state", "head", "capture h", "forward"]
    assert all(p.original is ABSENT for p in patches)
    assert isinstance(getattr(model, HEAD_ATTRIBUTE), SPRMHead)
    assert any(name.startswith(HEAD_ATTRIBUTE + ".") for name, _ in model.named_parameters())
    assert "sprm_rewards" in inspect.signature(model.forward).parameters  # Trainer keeps the column
    # Without sprm_rewards the patched model is the plain model.
    torch.testing.assert_close(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, before)
    with pytest.raises(RuntimeError, match="already patched"):
        apply_sprm(model)

    assert revert_sprm(model) == patches
    assert not is_patched(model)
    assert STATE_ATTRIBUTE not in model.__dict__ and "forward" not in model.__dict__ and "forward" not in layer.__dict__
    assert not hasattr(model, HEAD_ATTRIBUTE) and type(model).forward is class_forward
    assert not any(name.startswith(HEAD_ATTRIBUTE) for name, _ in model.named_parameters())
    torch.testing.assert_close(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, before)
    with pytest.raises(ValueError, match="not patched"):
        revert_sprm(model)


def test_revert_restores_an_instance_forward_that_was_there_before():
    model = tiny_model()
    calls = []
    plain_forward = model.forward

    def hooked_forward(*args, **kwargs):  # what accelerate's hooks do: an instance-level forward
        calls.append(1)
        return plain_forward(*args, **kwargs)

    model.forward = hooked_forward
    patches = apply_sprm(model, rule=STEP_ID)
    assert patches[-1].original is hooked_forward
    ids = torch.tensor([[5, 6, STEP_ID, 7]])
    model(input_ids=ids, sprm_rewards=torch.tensor([1.0]))
    assert calls == [1]
    revert_sprm(model)
    assert model.__dict__["forward"] is hooked_forward


def test_revert_refuses_when_someone_patched_on_top():
    model = tiny_model()
    apply_sprm(model, rule=STEP_ID)
    model.forward = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="replaced again"):
        revert_sprm(model)


def test_head_from_pretrained_path_and_errors(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    apply_sprm(model, head=str(tiny_model_dir), rule=STEP_ID)
    expected = SPRMHead.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(getattr(model, HEAD_ATTRIBUTE)[0].weight, expected[0].weight)
    ids = torch.tensor([[5, 6, STEP_ID, 7, STEP_ID]])
    with pytest.raises(ValueError, match="sprm_rewards has 2 entries for a batch of 1 rows|packed sequences need"):
        model(input_ids=ids, sprm_rewards=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="holds 1 sequences but sprm_rewards has 2"):
        model(input_ids=ids, position_ids=torch.arange(5)[None], sprm_rewards=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="return_dict=True"):
        model(input_ids=ids, sprm_rewards=torch.tensor([1.0]), return_dict=False)
    with pytest.raises(ValueError, match="without sprm_rewards"):
        model(input_ids=ids, sprm_response_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="sprm_response_mask has shape"):
        model(input_ids=ids, sprm_rewards=torch.tensor([1.0]), sprm_response_mask=torch.ones(1, 4))
    revert_sprm(model)
    apply_sprm(model)
    with pytest.raises(ValueError, match="no step token is known"):
        model(input_ids=ids, sprm_rewards=torch.tensor([1.0]))
    revert_sprm(model)
    with pytest.raises(ValueError, match="hidden size"):
        apply_sprm(model, head=SPRMHead(64))
    with pytest.raises(TypeError, match="rule"):
        apply_sprm(model, rule="x")
    assert not is_patched(model)


def test_unsupported_model_type_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="not supported"):
        apply_sprm(model, rule=3)


# ----- two processes (gloo) ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(batch: dict, rows: slice) -> dict:
    return {key: value[rows] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _distributed_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.set_num_threads(1)
        full = standard_batch()
        rows = slice(0, 3) if rank == 0 else slice(3, 5)
        batch, rewards = _split(full, rows), STANDARD_REWARDS[rows]
        model = tiny_model()
        for layout in ("padded", "packed_position_ids"):
            model.zero_grad(set_to_none=True)
            out = compare_to_released(model, batch, rewards, layout, all_reduce=True, head_batch=full)
            # the counts are summed over the ranks, so every rank sees the global numbers.
            counts = torch.stack([out.sprm_stats["num_positive"], out.sprm_stats["num_negative"]])
            gathered = [torch.zeros_like(counts) for _ in range(world)]
            dist.all_gather(gathered, counts)
            assert all(torch.equal(g, gathered[0]) for g in gathered)

        # verl's one call, counts all-reduced over the default group.
        head = released_head(model, full)
        model.zero_grad(set_to_none=True)
        loss_ref, metrics_ref, _, _ = released_score_loss(model, batch, rewards, head, STEP_ID, all_reduce=True)
        rm = rmpad(batch)
        hidden = packed_hidden(model, rm)
        loss, stats = sprm_score_loss(
            hidden, rm.input_ids, rm.response_mask, rewards, rm.indices, rm.batch_size, rm.seqlen, head, STEP_ID
        )
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)

        # DistributedDataParallel around the patched model: gradients are the rank average.
        model.zero_grad(set_to_none=True)
        reference_head = released_head(model, full)
        ours = patched_copy(model, reference_head)
        loss_ref, _, _, _ = released_score_loss(model, batch, rewards, reference_head, STEP_ID, all_reduce=True)
        loss_ref.backward()
        expected = {**grads(model), **{f"{HEAD_ATTRIBUTE}.{k}": v for k, v in grads(reference_head).items()}}
        for g in expected.values():
            dist.all_reduce(g)
            g /= world
        wrapped = DistributedDataParallel(ours, find_unused_parameters=True)
        out = wrapped(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
            sprm_rewards=rewards, sprm_response_mask=response_masks(batch),
        )
        out.sprm_loss.backward()
        assert_grads_close(grads(ours), expected, rtol=1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_gloo():
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, _free_port()), nprocs=2, join=True)
