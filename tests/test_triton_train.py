"""Fused training op of the Triton backend: forward, SPR loss and gradients against eager autograd.

Runs under the interpreter without a GPU (see ``test_triton_ops`` for how the environment is set).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_triton_ops import env, make_head, randn  # noqa: F401  (env is a fixture)
from xbai_kernels.ops import reference
from xbai_kernels.ops.triton import train

GRAD_NAMES = ("loss", "logits", "hidden", "w1", "b1", "w2", "b2")


def _problem(d: int, num_tokens: int, n: int, device, dtype=torch.float32, seed: int = 0):
    """hidden [num_tokens, d], step rows [n] (unique, unsorted), outcome flags, head params with grads."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(num_tokens, generator=g)[:n].to(device)
    correct = (torch.rand(n, generator=g) < 0.5).to(device)
    valid = (torch.rand(n, generator=g) < 0.9).to(device)
    hidden = randn(num_tokens, d, device=device, dtype=dtype, seed=seed + 1)
    weights = make_head(d, device, dtype=dtype, seed=seed + 2)
    return hidden, rows, correct, valid, weights


def _run(op, hidden, rows, weights, correct, valid, p=0.0, scale=1e-4, generator=None):
    """Loss, logits and every gradient of (loss + 0.1 * sum(logits)), the logits term so that the
    gradient through ``logits`` is exercised even where SPR's filter keeps few rows."""
    hidden = hidden.detach().clone().requires_grad_()
    params = [w.detach().clone().requires_grad_() for w in weights]
    loss, logits, stats = op(hidden, rows, *params, correct, valid, p, scale, None, generator)
    (loss + 0.1 * logits.sum()).backward()
    return [loss.detach(), logits.detach(), hidden.grad] + [w.grad for w in params], stats


def _eager_with_mask(hidden, rows, weights, correct, valid, keep, p, scale=1e-4):
    """The released form with a given keep mask (bool [n, 2d]), in the inputs' dtype."""
    hidden = hidden.detach().clone().requires_grad_()
    w1, b1, w2, b2 = params = [w.detach().clone().requires_grad_() for w in weights]
    h = hidden[rows]
    h = h * scale + h.detach() * (1 - scale)
    act = torch.relu(F.linear(h, w1, b1))
    if keep is not None:
        act = act * keep.to(act.dtype) / (1 - p)
    logits = F.linear(act, w2, b2).squeeze(-1).float()
    loss, _ = reference.spr_loss(logits, correct, valid, torch.ones_like(correct))
    (loss + 0.1 * logits.sum()).backward()
    return [loss.detach(), logits.detach(), hidden.grad] + [w.grad for w in params]


@pytest.mark.parametrize("d", [59, 96])
@pytest.mark.parametrize("n", [1, 3, 17, 40])
def test_no_dropout_matches_reference_autograd(env, d, n):
    triton_ops, device = env
    hidden, rows, correct, valid, weights = _problem(d, 50, n, device, seed=n)
    ours, stats = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid)
    expected, expected_stats = _run(reference.sprm_head_loss, hidden, rows, weights, correct, valid)
    for name, a, b in zip(GRAD_NAMES, ours, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    assert stats.keys() == expected_stats.keys()
    for key in stats:
        assert torch.equal(stats[key], expected_stats[key]), key
    if n == 40:
        assert ours[0] > 0  # enough rows that SPR's filter keeps both classes: the loss path is exercised


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gradients_within_torch_error(env, dtype):
    """Against a float64 autograd reference, our error is at most 2x eager PyTorch's in the same dtype."""
    triton_ops, device = env
    hidden, rows, correct, valid, weights = _problem(64, 60, 40, device, dtype=dtype, seed=5)
    ours, _ = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid)
    eager = _eager_with_mask(hidden, rows, weights, correct, valid, None, 0.0)
    exact = _eager_with_mask(hidden.double(), rows, [w.double() for w in weights], correct, valid, None, 0.0)
    for name, a, b, ref in zip(GRAD_NAMES, ours, eager, exact):
        ours_error = (a.double() - ref.double()).abs().max().item()
        eager_error = (b.double() - ref.double()).abs().max().item()
        scale = ref.double().abs().max().item()
        assert ours_error <= 2 * eager_error + 1e-6 * max(scale, 1.0), (name, ours_error, eager_error)


def test_dropout_mask_is_the_one_used_in_forward_and_backward(env):
    triton_ops, device = env
    p = 0.5
    hidden, rows, correct, valid, weights = _problem(59, 50, 17, device, seed=2)
    ours, _ = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, p, generator=_gen(device, 7))
    seed = train.draw_seed(device, _gen(device, 7))
    keep = train.dropout_keep_mask(seed, 17, 2 * 59, p)
    expected = _eager_with_mask(hidden, rows, weights, correct, valid, keep, p)
    for name, a, b in zip(GRAD_NAMES, ours, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def _gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def test_dropout_same_seed_same_bits_other_seed_differs(env):
    triton_ops, device = env
    hidden, rows, correct, valid, weights = _problem(64, 40, 17, device, seed=3)
    first, _ = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, 0.5, generator=_gen(device, 11))
    again, _ = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, 0.5, generator=_gen(device, 11))
    other, _ = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, 0.5, generator=_gen(device, 12))
    for name, a, b in zip(GRAD_NAMES, first, again):
        assert torch.equal(a, b), name
    assert not torch.equal(first[1], other[1])
    torch.manual_seed(5)
    from_default = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, 0.5)[0]
    torch.manual_seed(5)
    assert torch.equal(from_default[1], _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, 0.5)[0][1])


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_kept_fraction_is_one_minus_p(env, p):
    _, device = env
    n, units = 128, 256
    keep = train.dropout_keep_mask(train.draw_seed(device, _gen(device, 1)), n, units, p)
    fraction = keep.float().mean().item()
    sigma = (p * (1 - p) / (n * units)) ** 0.5
    assert abs(fraction - (1 - p)) < 5 * sigma
    # The four units sharing one Philox call, and neighbouring rows, get independent draws.
    lanes = [keep[:, k::4].float() for k in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            agreement = (lanes[a] == lanes[b]).float().mean().item()
            expected = p * p + (1 - p) * (1 - p)
            assert abs(agreement - expected) < 0.05, (a, b, agreement)
    assert not torch.equal(keep[0], keep[1])


def test_backbone_grad_scale_scales_only_hidden(env):
    triton_ops, device = env
    hidden, rows, correct, valid, weights = _problem(64, 30, 17, device, seed=4)
    small, _ = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, scale=1e-4)
    full, _ = _run(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, scale=1.0)
    torch.testing.assert_close(small[2], full[2] * 1e-4, atol=1e-9, rtol=1e-5)
    for name, a, b in zip(GRAD_NAMES[3:], small[3:], full[3:]):
        assert torch.equal(a, b), name
    untouched = torch.ones(30, dtype=torch.bool, device=device)
    untouched[rows] = False
    assert torch.all(small[2][untouched] == 0)


def test_second_backward_through_one_forward_is_an_error(env):
    """The backward overwrites its saved activation in place; a retained graph must fail loudly."""
    triton_ops, device = env
    hidden, rows, correct, valid, weights = _problem(64, 30, 17, device, seed=9)
    params = [w.detach().clone().requires_grad_() for w in weights]
    loss, logits, _ = triton_ops.sprm_head_loss(hidden, rows, *params, correct, valid, 0.0, 1e-4)
    logits.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        logits.sum().backward()


def test_no_step_rows(env):
    triton_ops, device = env
    hidden, _, _, _, weights = _problem(64, 10, 0, device)
    none = torch.zeros(0, dtype=torch.bool, device=device)
    grads, _ = _run(triton_ops.sprm_head_loss, hidden, torch.zeros(0, dtype=torch.int64, device=device), weights, none, none, 0.5)
    assert grads[1].shape == (0,)
    assert torch.all(grads[2] == 0) and torch.all(grads[3] == 0)


def test_public_api_through_dispatch(env, monkeypatch):
    """xbai_kernels.sprm_head_loss with the triton backend forced equals the reference backend."""
    import xbai_kernels as xk

    _, device = env
    d = 64
    head = xk.SPRMHead(d).to(device)
    hidden = randn(3, 20, d, device=device, seed=8)
    step_mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(9)).to(device) < 0.4
    rewards = torch.tensor([1.0, 0.0, 0.1], device=device)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("XBAI_KERNELS_BACKEND", backend)
        head.zero_grad()
        loss, stats = xk.sprm_head_loss(hidden, head, step_mask, rewards, dropout_p=0.0)
        loss.backward()
        results[backend] = (loss.detach(), stats["logits"], [p.grad.clone() for p in head.parameters()])
    ref, ours = results["reference"], results["triton"]
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(ours[2], ref[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_counts_all_reduced_over_process_group(env, tmp_path):
    """With a (one-rank) gloo group the op takes the reference's all-reduce path and agrees with it."""
    import torch.distributed as dist

    triton_ops, device = env
    if device.type != "cpu" or not dist.is_available():
        pytest.skip("gloo on CPU tensors only")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        hidden, rows, correct, valid, weights = _problem(64, 50, 40, device, seed=6)
        ours = triton_ops.sprm_head_loss(hidden, rows, *weights, correct, valid, 0.0, 1e-4, True, None)
        expected = reference.sprm_head_loss(hidden, rows, *weights, correct, valid, 0.0, 1e-4, True, None)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)
    assert ours[2]["num_positive"] == expected[2]["num_positive"]


def test_rejects_bad_inputs(env):
    triton_ops, device = env
    hidden, rows, correct, valid, weights = _problem(64, 10, 3, device)
    with pytest.raises(ValueError, match="dropout_p"):
        triton_ops.sprm_head_loss(hidden, rows, *weights, correct, valid, 1.0, 1e-4)
    with pytest.raises(ValueError, match="correct has 2 entries"):
        triton_ops.sprm_head_loss(hidden, rows, *weights, correct[:2], valid, 0.5, 1e-4)
    with pytest.raises(TypeError, match="valid"):
        triton_ops.sprm_head_loss(hidden, rows, *weights, correct, valid.float(), 0.5, 1e-4)
