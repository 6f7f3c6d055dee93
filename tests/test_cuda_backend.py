"""The CUDA backend (xbai_kernels.ops.cuda over the compiled _C) against the reference oracle, the
golden vectors and the Triton backend; its registered ops under opcheck, torch.compile and CUDA
graphs; bitwise determinism. GPU tests carry the ``cuda`` marker; the CPU tests check the messages.

Accuracy rule (DESIGN, from flash-attention): on 16-bit inputs the kernel's error against an fp64
computation is at most 2x the error of plain PyTorch in that dtype; against the reference on the
same 16-bit inputs (fp32 math) it differs only by summation order.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from xbai_kernels.ops import cuda as cuda_ops
from xbai_kernels.ops import dispatch, reference

HAS_KERNELS = torch.cuda.is_available() and cuda_ops.unavailable_reason() is None
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="needs a CUDA GPU and the built _C")
DTYPES = (torch.bfloat16, torch.float16)
# Summation order alone (fp32 accumulators over d <= 5120) moves a logit by far less than this.
SAME_INPUT_RTOL = 2e-5


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def _random_head(d: int, dtype: torch.dtype, seed: int = 0, device: str = "cuda"):
    """Weights scaled like a trained head (logits of order 1), cast to ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w1 = torch.randn(2 * d, d, generator=g) / d**0.5
    b1 = torch.randn(2 * d, generator=g) * 0.1
    w2 = torch.randn(1, 2 * d, generator=g) / (2 * d) ** 0.5
    b2 = torch.randn(1, generator=g) * 0.1
    return tuple(t.to(device=device, dtype=dtype) for t in (w1, b1, w2, b2))


def _random_inputs(rows: int, d: int, dtype: torch.dtype, seed: int = 1, device: str = "cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, d, generator=g).to(device=device, dtype=dtype)


def _step_mask(batch: int, steps: int, seed: int = 2, device: str = "cuda") -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[torch.randperm(batch, generator=g)[:steps]] = True
    return mask.to(device)


def _fp64_logits(hidden, w1, b1, w2, b2) -> torch.Tensor:
    a = torch.relu(hidden.double() @ w1.double().T + b1.double())
    return (a @ w2.double().T).squeeze(-1) + b2.double()


def _torch_lowp_logits(hidden, w1, b1, w2, b2) -> torch.Tensor:
    """Plain PyTorch in the inputs' dtype: the error yardstick."""
    a = torch.relu(torch.nn.functional.linear(hidden, w1, b1))
    return torch.nn.functional.linear(a, w2, b2).squeeze(-1).float()


def _triton_backend():
    module = dispatch._load("triton")
    if isinstance(module, str) or dispatch.unavailable_reason("triton", torch.device("cuda")) is not None:
        return None
    return module


# ---------------------------------------------------------------- CPU: messages and routing


def test_missing_module_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_C", None)
    monkeypatch.setattr(cuda_ops, "_IMPORT_ERROR", "No module named 'xbai_kernels._C'")
    reason = cuda_ops.unavailable_reason()
    assert "XBAI_KERNELS_BUILD_CUDA=1" in reason and "nvcc on PATH" in reason
    assert cuda_ops.compiled_targets() is None


def test_cpu_tensors_are_refused_with_a_clear_error():
    w1, b1, w2, b2 = _random_head(16, torch.bfloat16, device="cpu")
    hidden = _random_inputs(4, 16, torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda_ops.head_logits_masked(hidden, torch.ones(4, dtype=torch.bool), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w1"):
        cuda_ops.head_logits(hidden, w1[:, :8], b1, w2, b2)


def test_ops_have_fake_implementations_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w1, b1, w2, b2 = (torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in ((32, 16), (32,), (1, 32), (1,)))
        hidden = torch.empty(5, 16, dtype=torch.bfloat16, device="cuda")
        mask = torch.empty(5, dtype=torch.bool, device="cuda")
        rows = torch.empty(3, dtype=torch.int64, device="cuda")
        ops = torch.ops.xbai_kernels
        assert ops.cuda_head_logits(hidden, w1, b1, w2, b2).shape == (5,)
        assert ops.cuda_head_logits_rows(hidden, rows, w1, b1, w2, b2).shape == (3,)
        out = ops.cuda_head_logits_masked(hidden, mask, w1, b1, w2, b2)
        assert out.shape == (5,) and out.dtype == torch.float32


# ---------------------------------------------------------------- GPU: numbers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.cuda
@needs_kernels
def test_golden_vectors(golden, d, dtype):
    w1, b1, w2, b2 = (t.detach().cuda().to(dtype) for t in golden.head(d).weights)
    for case in golden.trajectories:
        hidden = case.hidden[d].cuda().to(dtype)
        mask = case.mask.cuda()
        rows = mask.nonzero().squeeze(-1)
        masked = cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2)
        packed = cuda_ops.head_logits_rows(hidden, rows, w1, b1, w2, b2)
        assert torch.all(masked[~mask] == 0.0), case.name
        # Each logit is its own dot product: the same bits whatever batch it was computed in.
        assert torch.equal(masked[mask], packed), case.name
        if rows.numel() == 0:
            continue
        expected = reference.head_logits_rows(hidden, rows, w1, b1, w2, b2)
        assert _relative_error(packed, expected) <= SAME_INPUT_RTOL, case.name
        # Against the released fp32 numbers the 16-bit inputs themselves cost up to ~1e-2 (golden
        # README); PyTorch's error on the same inputs, in 16-bit or fp32 math, is the yardstick.
        golden_logits = case.logits[d].cuda()
        torch_error = max(
            _relative_error(_torch_lowp_logits(hidden[rows], w1, b1, w2, b2), golden_logits),
            _relative_error(expected, golden_logits),
        )
        assert _relative_error(packed, golden_logits) <= 2 * torch_error + 1e-4, case.name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1536, 3584, 5120])
@pytest.mark.parametrize("batch", [1, 16, 256])
@pytest.mark.cuda
@needs_kernels
def test_decode_parity_random(d, dtype, batch):
    w1, b1, w2, b2 = _random_head(d, dtype, seed=d)
    hidden = _random_inputs(batch, d, dtype, seed=batch)
    mask = _step_mask(batch, max(1, batch // 4))
    out = torch.full((batch,), float("nan"), device="cuda")
    result = cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2, out=out)
    assert result is out
    assert torch.all(out[~mask] == 0.0)
    expected = reference.head_logits_masked(hidden, mask, w1, b1, w2, b2)
    assert _relative_error(out, expected) <= SAME_INPUT_RTOL
    truth = _fp64_logits(hidden[mask], w1, b1, w2, b2)
    lowp_error = _relative_error(_torch_lowp_logits(hidden[mask], w1, b1, w2, b2), truth)
    assert _relative_error(out[mask], truth) <= 2 * lowp_error
    triton_ops = _triton_backend()
    if triton_ops is not None and hasattr(triton_ops, "head_logits_masked"):
        theirs = triton_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2)
        assert _relative_error(out, theirs) <= 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.cuda
@needs_kernels
def test_packed_rows_and_all_rows_parity(dtype):
    """Many chunks (the grouped tile order), repeated and unsorted indices, int32 indices, d = 1536."""
    d = 1536
    w1, b1, w2, b2 = _random_head(d, dtype, seed=7)
    hidden = _random_inputs(1000, d, dtype, seed=8)
    rows = torch.randint(0, 1000, (333,), generator=torch.Generator().manual_seed(9)).cuda()
    packed = cuda_ops.head_logits_rows(hidden, rows.int(), w1, b1, w2, b2)
    assert _relative_error(packed, reference.head_logits_rows(hidden, rows, w1, b1, w2, b2)) <= SAME_INPUT_RTOL
    every = cuda_ops.head_logits(hidden, w1, b1, w2, b2)
    assert _relative_error(every, reference.head_logits(hidden, w1, b1, w2, b2)) <= SAME_INPUT_RTOL
    assert torch.equal(every[rows], packed)
    triton_ops = _triton_backend()
    if triton_ops is not None and hasattr(triton_ops, "head_logits_rows"):
        assert _relative_error(packed, triton_ops.head_logits_rows(hidden, rows, w1, b1, w2, b2)) <= 1e-3


@pytest.mark.cuda
@needs_kernels
def test_edge_inputs():
    d = 96
    w1, b1, w2, b2 = _random_head(d, torch.bfloat16)
    # No step row: all zeros (and the kernel returns before reading W1).
    hidden = _random_inputs(32, d, torch.bfloat16)
    zeros = cuda_ops.head_logits_masked(hidden, torch.zeros(32, dtype=torch.bool, device="cuda"), w1, b1, w2, b2)
    assert torch.equal(zeros, torch.zeros(32, device="cuda"))
    # Rows that are not steps are never read: NaN there leaves the steps and the zeros intact.
    mask = _step_mask(32, 5)
    poisoned = hidden.clone()
    poisoned[~mask] = float("nan")
    out = cuda_ops.head_logits_masked(poisoned, mask, w1, b1, w2, b2)
    assert torch.equal(out, cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2))
    # A strided view (rows of a wider buffer) is read in place.
    wide = _random_inputs(32, 3 * d, torch.bfloat16)
    view = wide[:, d : 2 * d]
    assert _relative_error(cuda_ops.head_logits(view, w1, b1, w2, b2), reference.head_logits(view, w1, b1, w2, b2)) <= SAME_INPUT_RTOL
    # An index outside hidden gives NaN for that row only, without a host check.
    rows = torch.tensor([0, 32, -1, 5], device="cuda")
    bad = cuda_ops.head_logits_rows(hidden, rows, w1, b1, w2, b2)
    assert torch.isnan(bad[1]) and torch.isnan(bad[2]) and not torch.isnan(bad[[0, 3]]).any()
    # fp32 and odd hidden sizes are refused here (a backend runs or raises); the router sends them
    # to a backend that takes them, which gives the reference's numbers.
    w1f, b1f, w2f, b2f = _random_head(59, torch.float32)
    h32 = _random_inputs(7, 59, torch.float32)
    with pytest.raises(ValueError, match="head_logits: the cuda backend cannot run float32 inputs"):
        cuda_ops.head_logits(h32, w1f, b1f, w2f, b2f)
    torch.testing.assert_close(
        dispatch.call("head_logits", h32.device, h32, w1f, b1f, w2f, b2f), reference.head_logits(h32, w1f, b1f, w2f, b2f)
    )
    # Empty batches.
    assert cuda_ops.head_logits_rows(hidden, rows[:0], w1, b1, w2, b2).shape == (0,)


@pytest.mark.cuda
@needs_kernels
def test_bitwise_deterministic_run_to_run():
    d = 5120
    w1, b1, w2, b2 = _random_head(d, torch.bfloat16, seed=3)
    hidden = _random_inputs(256, d, torch.bfloat16, seed=4)
    mask = _step_mask(256, 64)
    first = cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2)
    for _ in range(5):
        assert torch.equal(cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2), first)


@pytest.mark.parametrize("batch", [1, 16, 32, 256])
@pytest.mark.cuda
@needs_kernels
def test_pipeline_shapes_give_the_same_bits(monkeypatch, batch):
    """Every tile configuration (one per chunk width, wide and deep) adds in the same order."""
    d = 1536
    w1, b1, w2, b2 = _random_head(d, torch.bfloat16, seed=12)
    hidden = _random_inputs(batch, d, torch.bfloat16, seed=13)
    mask = _step_mask(batch, batch // 2 + 1)
    results = {}
    for name in ("wide", "deep", "auto", "stream"):
        with cuda_ops.launch_settings(pipeline=name):
            results[name] = cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2)
    assert all(torch.equal(results["wide"], results[name]) for name in ("deep", "auto", "stream"))
    expected = reference.head_logits_masked(hidden, mask, w1, b1, w2, b2)
    assert _relative_error(results["wide"], expected) <= SAME_INPUT_RTOL


@pytest.mark.parametrize(
    ("d", "batch", "steps"),
    [
        (96, 5, 3),  # one stage, its second TMA box half past d
        (1000, 16, 7),  # d not a multiple of the 128-column stage: zero-filled tail
        (1536, 1, 1),
        (3584, 16, 4),
        (5120, 1, 1),
        (5120, 16, 4),
        (5120, 256, 64),  # one 64-row chunk
        (5120, 64, 37),  # 37 of the 64-row configuration's rows filled
        (96, 64, 40),  # a 12-CTA grid at 64 rows
        (5120, 256, 256),  # four chunks, W1 streamed four times
        (8192, 32, 9),  # two boxes per CTA: the ring's phases carry over
        (8192, 4, 3),  # the same at 256-column stages
        (1536, 1024, 256),  # 16 chunks, the second-kernel tail
        (5120, 256, 0),  # no step row: zeros, W1 not read
    ],
)
@pytest.mark.parametrize("tail", ["fused", "kernel"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.cuda
@needs_kernels
def test_stream_kernel_gives_the_cp_async_bits(monkeypatch, d, batch, steps, tail, dtype):
    """The sm_90 TMA kernel (both stage widths: 256 columns up to 16 rows, 128 above), with either
    tail, adds in the same order as the cp.async kernel."""
    w1, b1, w2, b2 = _random_head(d, dtype, seed=d + 5)
    hidden = _random_inputs(batch, d, dtype, seed=batch + 6)
    mask = _step_mask(batch, steps, seed=steps + 7)
    with cuda_ops.launch_settings(pipeline="wide"):
        expected_bits = cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2)
    # Garbage in `out` first: every logit, step or not, must be written.
    out = torch.full((batch,), float("nan"), device="cuda")
    with cuda_ops.launch_settings(pipeline="stream", tail=tail):
        for _ in range(3):  # the ticket counter wraps back to 0 after each call
            streamed = cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2, out=out)
            assert torch.equal(streamed, expected_bits), float((streamed - expected_bits).abs().max())
    expected = reference.head_logits_masked(hidden, mask, w1, b1, w2, b2)
    if steps:
        assert _relative_error(streamed, expected) <= SAME_INPUT_RTOL
    else:
        assert torch.equal(streamed, expected)


def test_launch_settings_are_read_once_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("XBAI_KERNELS_CUDA_TAIL", "sideways")
    with pytest.raises(ValueError, match="XBAI_KERNELS_CUDA_TAIL='sideways' is not one of auto, fused, kernel"):
        cuda_ops.LaunchSettings.from_env()
    monkeypatch.setenv("XBAI_KERNELS_CUDA_TAIL", "fused")
    monkeypatch.setenv("XBAI_KERNELS_CUDA_PIPELINE", "bulk")  # the copy-engine kernel the stream kernel replaced
    with pytest.raises(ValueError, match="XBAI_KERNELS_CUDA_PIPELINE='bulk' is not one of wide, deep, auto, stream"):
        cuda_ops.LaunchSettings.from_env()
    monkeypatch.setenv("XBAI_KERNELS_CUDA_PIPELINE", "deep")
    monkeypatch.setenv("XBAI_KERNELS_CUDA_PDL", "yes")
    with pytest.raises(ValueError, match="XBAI_KERNELS_CUDA_PDL='yes' must be 0 or 1"):
        cuda_ops.LaunchSettings.from_env()
    monkeypatch.setenv("XBAI_KERNELS_CUDA_PDL", "0")
    assert cuda_ops.LaunchSettings.from_env() == cuda_ops.LaunchSettings("deep", "fused", False)
    # The module read the variables when it loaded; changing them later changes nothing.
    assert cuda_ops.current_launch_settings() == cuda_ops.LaunchSettings()
    with cuda_ops.launch_settings(pipeline="stream", tail="kernel") as inside:
        assert cuda_ops.current_launch_settings() == inside == cuda_ops.LaunchSettings("stream", "kernel", True)
    assert cuda_ops.current_launch_settings() == cuda_ops.LaunchSettings()
    with pytest.raises(ValueError, match="pipeline='sideways' is not one of"):
        with cuda_ops.launch_settings(pipeline="sideways"):
            pass


@pytest.mark.cuda
@needs_kernels
def test_stream_kernel_single_chunk_rows_and_bad_index(monkeypatch):
    """head_logits / head_logits_rows on one chunk of rows take the sm_90 kernel too; a bad index is not copied."""
    d = 1536
    w1, b1, w2, b2 = _random_head(d, torch.bfloat16, seed=21)
    hidden = _random_inputs(12, d, torch.bfloat16, seed=22)
    rows = torch.tensor([0, 12, -1, 5, 11], device="cuda")
    results = {}
    for name in ("wide", "stream"):
        with cuda_ops.launch_settings(pipeline=name):
            results[name] = (cuda_ops.head_logits(hidden, w1, b1, w2, b2), cuda_ops.head_logits_rows(hidden, rows, w1, b1, w2, b2))
    every, picked = results["stream"]
    assert _relative_error(every, reference.head_logits(hidden, w1, b1, w2, b2)) <= SAME_INPUT_RTOL
    assert torch.isnan(picked[[1, 2]]).all() and torch.equal(picked[[0, 3, 4]], every[[0, 5, 11]])
    wide_every, wide_picked = results["wide"]
    assert torch.equal(wide_every, every)
    assert torch.equal(wide_picked.isnan(), picked.isnan()) and torch.equal(wide_picked[[0, 3, 4]], picked[[0, 3, 4]])


@pytest.mark.cuda
@needs_kernels
def test_opcheck_registered_ops():
    d = 64
    w1, b1, w2, b2 = _random_head(d, torch.bfloat16)
    hidden = _random_inputs(20, d, torch.bfloat16)
    mask = _step_mask(20, 6)
    rows = torch.tensor([3, 1, 19, 3], device="cuda")
    ops = torch.ops.xbai_kernels
    torch.library.opcheck(ops.cuda_head_logits, (hidden, w1, b1, w2, b2))
    torch.library.opcheck(ops.cuda_head_logits_rows, (hidden, rows, w1, b1, w2, b2))
    torch.library.opcheck(ops.cuda_head_logits_masked, (hidden, mask, w1, b1, w2, b2))
    out = torch.empty(20, device="cuda")
    torch.library.opcheck(ops.cuda_head_logits_masked_out, (hidden, mask, w1, b1, w2, b2, out))
    # The decode scorer's bookkeeping: 4 slots of capacity 3, rows 0 and 2 sample step token 5.
    last_token = torch.tensor([1, 5, 2, -1], device="cuda")
    slots = torch.tensor([0, 2], device="cuda")
    sampled = torch.tensor([5, 5], device="cuda")
    table = torch.zeros(8, dtype=torch.bool, device="cuda")
    table[5] = True
    torch.library.opcheck(ops.cuda_decode_candidates, (last_token, sampled, slots, table, 3))
    state = (torch.zeros(4, 4, dtype=torch.int64, device="cuda"), torch.zeros(4, 4, device="cuda"),
             torch.zeros(4, dtype=torch.int64, device="cuda"), last_token.clone())
    is_step = torch.tensor([True, False], device="cuda")
    logits = torch.tensor([0.5, 0.0], device="cuda")
    positions = torch.tensor([7, 9], device="cuda")
    torch.library.opcheck(ops.cuda_decode_record, (*state, slots, positions, sampled, is_step, logits, 3, 4))


def test_registered_ops_refuse_cpu_tensors():
    """Called directly on CPU tensors, a registered op fails in the dispatcher: no host pointer ever
    reaches a kernel (the public functions check first and name the problem)."""
    index = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.xbai_kernels.cuda_decode_candidates(index, index, index, torch.zeros(3, dtype=torch.bool), 1)
    with pytest.raises(NotImplementedError, match="CPU"):
        weights = _random_head(8, torch.bfloat16, device="cpu")
        torch.ops.xbai_kernels.cuda_head_logits(torch.zeros(2, 8, dtype=torch.bfloat16), *weights)


@pytest.mark.cuda
@needs_kernels
def test_cuda_graph_capture_and_replay():
    d = 1536
    w1, b1, w2, b2 = _random_head(d, torch.float16, seed=5)
    hidden = _random_inputs(16, d, torch.float16, seed=6)
    mask = _step_mask(16, 4)
    out = torch.empty(16, device="cuda")
    cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2, out=out)  # first call outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ops.head_logits_masked(hidden, mask, w1, b1, w2, b2, out=out)
    for seed in (10, 11):
        hidden.copy_(_random_inputs(16, d, torch.float16, seed=seed))
        mask.copy_(_step_mask(16, seed % 7, seed=seed))
        graph.replay()
        expected = reference.head_logits_masked(hidden, mask, w1, b1, w2, b2)
        assert _relative_error(out, expected) <= SAME_INPUT_RTOL or (not mask.any() and torch.equal(out, expected))


@pytest.mark.cuda
@needs_kernels
def test_torch_compile_fullgraph():
    d = 64
    w1, b1, w2, b2 = _random_head(d, torch.bfloat16)
    hidden = _random_inputs(12, d, torch.bfloat16)
    mask = _step_mask(12, 3)

    def step_scores(h, m):
        return torch.sigmoid(cuda_ops.head_logits_masked(h, m, w1, b1, w2, b2)) * m

    compiled = torch.compile(step_scores, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, mask), step_scores(hidden, mask))


@pytest.mark.cuda
@needs_kernels
def test_dispatch_forced_cuda_backend(monkeypatch):
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "cuda")
    name, fn = dispatch.resolve("head_logits_masked", torch.device("cuda", 0), dispatch.HeadInputs(torch.bfloat16, 1536, False))
    assert name == "cuda" and fn is cuda_ops.head_logits_masked
    assert importlib.import_module("xbai_kernels._C").compiled_targets().split().count("sm_90a") == 1
