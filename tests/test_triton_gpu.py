"""Triton kernels on a CUDA GPU at the released models' sizes: accuracy, no host sync, CUDA graphs,
determinism. (Speed lives in benchmarks/bench_kernels.py, never in tests.)

Error rule (flash-attention's): the kernel's error against a float64 reference is at most 2x plain
PyTorch's error in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"


def _backend():
    import xbai_kernels.ops.triton as triton_ops

    return triton_ops


def _head(d: int, dtype, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w1 = torch.randn(2 * d, d, device=DEVICE, generator=g) / d**0.5
    b1 = torch.randn(2 * d, device=DEVICE, generator=g) * 0.1
    w2 = torch.randn(1, 2 * d, device=DEVICE, generator=g) / (2 * d) ** 0.5
    b2 = torch.randn(1, device=DEVICE, generator=g)
    return [t.to(dtype) for t in (w1, b1, w2, b2)]


def _randn(*shape, dtype, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, device=DEVICE, generator=g).to(dtype)


def _mask(batch: int, fraction: float, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.rand(batch, device=DEVICE, generator=g) < fraction


def _exact(hidden, weights):
    w1, b1, w2, b2 = (t.double() for t in weights)
    return (torch.relu(hidden.double() @ w1.T + b1) @ w2.T + b2).squeeze(-1)


def _eager(hidden, weights):
    """The released head in the inputs' dtype (Linear, ReLU, Linear)."""
    w1, b1, w2, b2 = weights
    return F.linear(torch.relu(F.linear(hidden, w1, b1)), w2, b2).squeeze(-1).float()


def _assert_error_rule(actual, exact, eager, what):
    ours = (actual.double() - exact).abs().max().item()
    torch_error = (eager.double() - exact).abs().max().item()
    assert ours <= 2 * torch_error + 1e-5, (what, ours, torch_error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,batch", [(1536, 1), (1536, 256), (5120, 1), (5120, 16), (5120, 256), (5120, 1024), (8192, 64)])
def test_decode_error_rule(dtype, d, batch):
    weights = _head(d, dtype, seed=d)
    hidden = _randn(batch, d, dtype=dtype, seed=batch)
    mask = _mask(batch, 0.25, seed=batch + d)
    mask[0] = True
    out = _backend().head_logits_masked(hidden, mask, *weights)
    exact = torch.where(mask, _exact(hidden, weights), 0.0)
    eager = torch.where(mask, _eager(hidden, weights), 0.0)
    _assert_error_rule(out, exact, eager, f"decode d={d} B={batch} {dtype}")
    assert torch.all(out[~mask] == 0)


@pytest.mark.parametrize("batch", [16, 256])
def test_decode_no_host_sync_and_deterministic(batch):
    triton_ops = _backend()
    weights = _head(5120, torch.bfloat16)
    hidden = _randn(batch, 5120, dtype=torch.bfloat16, seed=1)
    mask = _mask(batch, 0.25, seed=2)
    out = torch.empty(batch, device=DEVICE)
    triton_ops.head_logits_masked(hidden, mask, *weights, out=out)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runs = [triton_ops.head_logits_masked(hidden, mask, *weights).clone() for _ in range(5)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for run in runs[1:]:
        assert torch.equal(run, runs[0])


def test_decode_scorer_step_no_host_sync(monkeypatch):
    import xbai_kernels as xk

    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "triton")
    d, slots = 1536, 64
    head = xk.SPRMHead(d).to(DEVICE, torch.bfloat16).eval()
    rule = xk.StepRule((13,), 3, 4)
    scorer = xk.DecodeScorer(head, rule, slots, capacity=64)
    slot_ids = torch.arange(slots, device=DEVICE)
    hidden = _randn(slots, d, dtype=torch.bfloat16, seed=3)
    for position in range(3):  # the first step compiles
        sampled = torch.where(_mask(slots, 0.25, seed=position), 13, 7)
        if position == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            scorer.step(hidden, sampled, slot_ids, torch.full((slots,), position, device=DEVICE))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert scorer.result(0).positions.numel() >= 0


@pytest.mark.parametrize("batch", [16, 256])  # single-launch and two-launch reductions
def test_decode_cuda_graph_replay(batch):
    """Captured once, replayed on new contents of the static inputs: same bits as eager calls."""
    triton_ops = _backend()
    d = 5120
    weights = _head(d, torch.bfloat16, seed=4)
    static_hidden = _randn(batch, d, dtype=torch.bfloat16, seed=5)
    static_mask = _mask(batch, 0.25, seed=6)
    static_out = torch.empty(batch, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_ops.head_logits_masked(static_hidden, static_mask, *weights, out=static_out)  # compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_ops.head_logits_masked(static_hidden, static_mask, *weights, out=static_out)
    for seed, fraction in ((7, 0.25), (8, 0.0), (9, 1.0), (10, 0.05)):
        static_hidden.copy_(_randn(batch, d, dtype=torch.bfloat16, seed=seed))
        static_mask.copy_(_mask(batch, fraction, seed=seed))
        graph.replay()
        expected = triton_ops.head_logits_masked(static_hidden, static_mask, *weights)
        assert torch.equal(static_out, expected), fraction
        if fraction == 0.0:
            assert torch.all(static_out == 0)


@pytest.mark.parametrize("d", [1536, 3584])
def test_packed_error_rule(d):
    total = 65536
    hidden = _randn(total, d, dtype=torch.bfloat16, seed=d)
    weights = _head(d, torch.bfloat16, seed=d + 1)
    rows = torch.nonzero(_mask(total, 0.02, seed=d + 2)).squeeze(-1)
    out = _backend().head_logits_rows(hidden, rows, *weights)
    selected = hidden[rows]
    _assert_error_rule(out, _exact(selected, weights), _eager(selected, weights), f"packed d={d}")
    assert torch.equal(out, _backend().head_logits_rows(hidden, rows, *weights))


def test_score_trajectories_capacity_no_host_sync(monkeypatch):
    import xbai_kernels as xk

    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "triton")
    d, total = 1536, 8192
    head = xk.SPRMHead(d).to(DEVICE, torch.bfloat16).eval()
    rule = xk.StepRule((13,), 3, 4)
    ids = torch.where(_mask(total, 0.05, seed=11), 13, 7)
    cu_seqlens = torch.tensor([0, 1000, 4000, total], dtype=torch.int32, device=DEVICE)
    hidden = _randn(total, d, dtype=torch.bfloat16, seed=12)
    expected = xk.score_trajectories(hidden, ids, head, rule, cu_seqlens)
    xk.score_trajectories(hidden, ids, head, rule, cu_seqlens, capacity=1024)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = xk.score_trajectories(hidden, ids, head, rule, cu_seqlens, capacity=1024)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    n = expected.logits.numel()
    assert int(result.cu_steps[-1]) == n
    torch.testing.assert_close(result.logits[:n], expected.logits)
    torch.testing.assert_close(result.scores, expected.scores)


def test_chained_launches_in_a_graph_give_the_bits_of_plain_launches(monkeypatch):
    """Programmatic dependent launch (each kernel's launch overlaps the end of the one before) must
    not let a kernel read its predecessor's output early: the packed scorer's chain of six kernels
    and the decode scorer's two launches, replayed in a graph many times, against plain launches."""
    import xbai_kernels as xk
    from xbai_kernels.ops.triton import _launch

    if not _launch.chained(torch.device(DEVICE))["USE_PDL"]:
        pytest.skip("no programmatic dependent launch here (needs Hopper or newer and Triton >= 3.4)")
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "triton")
    d, total, batch = 1536, 16384, 256
    head = xk.SPRMHead(d).to(DEVICE, torch.bfloat16).eval()
    rule = xk.StepRule((13,), 3, 4)
    ids = torch.where(_mask(total, 0.03, seed=21), 13, 7)
    cu_seqlens = torch.tensor([0, 5000, 5001, total], dtype=torch.int32, device=DEVICE)
    hidden = _randn(total, d, dtype=torch.bfloat16, seed=22)
    mask = _mask(batch, 0.25, seed=23)
    decode_out = torch.empty(batch, device=DEVICE)

    @torch.no_grad()  # the kernels have no backward, and the head's weights are parameters
    def run():
        result = xk.score_trajectories(hidden, ids, head, rule, cu_seqlens, capacity=1024)
        _backend().head_logits_masked(hidden[:batch], mask, *head.weights, out=decode_out)
        return result

    def plain():
        monkeypatch.setenv("XBAI_KERNELS_TRITON_PDL", "0")
        _launch._pdl_on.cache_clear()
        try:
            result = run()
            return [result.logits.clone(), result.scores.clone(), decode_out.clone()]
        finally:
            monkeypatch.delenv("XBAI_KERNELS_TRITON_PDL")
            _launch._pdl_on.cache_clear()

    expected = plain()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile the chained variants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(20):
        decode_out.zero_()
        graph.replay()
        got = [captured.logits, captured.scores, decode_out]
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def _train_step(op, hidden, rows, weights, correct, valid, p, generator=None):
    hidden = hidden.detach().clone().requires_grad_()
    params = [w.detach().clone().requires_grad_() for w in weights]
    loss, logits, _ = op(hidden, rows, *params, correct, valid, p, 1e-4, None, generator)
    (loss + 0.01 * logits.sum()).backward()
    return [loss.detach(), logits.detach(), hidden.grad[rows]] + [w.grad for w in params]


def _eager_train(hidden, rows, weights, correct, valid):
    from xbai_kernels.ops import reference

    hidden = hidden.detach().clone().requires_grad_()
    params = [w.detach().clone().requires_grad_() for w in weights]
    h = hidden[rows]
    h = h * 1e-4 + h.detach() * (1 - 1e-4)
    logits = F.linear(torch.relu(F.linear(h, params[0], params[1])), params[2], params[3]).squeeze(-1).float()
    loss, _ = reference.spr_loss(logits, correct, valid, torch.ones_like(correct))
    (loss + 0.01 * logits.sum()).backward()
    return [loss.detach(), logits.detach(), hidden.grad[rows]] + [w.grad for w in params]


def test_train_gradients_error_rule_and_dropout():
    triton_ops = _backend()
    d, total, n = 1536, 4096, 1024
    hidden = _randn(total, d, dtype=torch.bfloat16, seed=20)
    weights = _head(d, torch.bfloat16, seed=21)
    g = torch.Generator(device=DEVICE).manual_seed(22)
    rows = torch.randperm(total, device=DEVICE, generator=g)[:n]
    correct = torch.rand(n, device=DEVICE, generator=g) < 0.5
    valid = torch.rand(n, device=DEVICE, generator=g) < 0.9

    ours = _train_step(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, 0.0)
    eager = _eager_train(hidden, rows, weights, correct, valid)
    exact = _eager_train(hidden.double(), rows, [w.double() for w in weights], correct, valid)
    names = ("loss", "logits", "hidden", "w1", "b1", "w2", "b2")
    for name, a, b, ref in zip(names, ours, eager, exact):
        ours_error = (a.double() - ref.double()).abs().max().item()
        torch_error = (b.double() - ref.double()).abs().max().item()
        assert ours_error <= 2 * torch_error + 1e-6 * max(ref.double().abs().max().item(), 1.0), (name, ours_error, torch_error)

    first = _train_step(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, 0.5, torch.Generator(device=DEVICE).manual_seed(1))
    again = _train_step(triton_ops.sprm_head_loss, hidden, rows, weights, correct, valid, 0.5, torch.Generator(device=DEVICE).manual_seed(1))
    for name, a, b in zip(names, first, again):
        assert torch.equal(a, b), name

    from xbai_kernels.ops.triton import train

    keep = train.dropout_keep_mask(train.draw_seed(torch.device(DEVICE), torch.Generator(device=DEVICE).manual_seed(2)), n, 2 * d, 0.5)
    fraction = keep.float().mean().item()
    assert abs(fraction - 0.5) < 5 * (0.25 / keep.numel()) ** 0.5
