"""Triton backend against the reference ops, at awkward sizes (d = 59, 64, 96; rows 1, 3, 17).

Without a GPU the kernels run under Triton's interpreter: the module fixture sets
``TRITON_INTERPRET=1`` before the backend is imported (and re-imports it if something loaded it in
compiled mode earlier). With a GPU the same tests run the compiled kernels on it.
Error rule for 16-bit inputs (flash-attention's): the kernel's error against a float64 reference is
at most 2x plain PyTorch's error in the same dtype.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from xbai_kernels.ops import reference

HIDDEN_SIZES = (59, 64, 96)
ROW_COUNTS = (1, 3, 17)
FP32_TOL = dict(atol=1e-5, rtol=1e-5)

# Triton decides at import time (its own standard library and our @triton.jit kernels) whether to
# interpret; so the variable is set before the first import of triton, and put back afterwards so
# that other tests see the environment they were given (the fixture sets it again for ours).
INTERPRET = not torch.cuda.is_available()
_IMPORTED_COMPILED = INTERPRET and "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
_saved_interpret = os.environ.get("TRITON_INTERPRET")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    import xbai_kernels.ops.triton as triton_backend
finally:
    if _saved_interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret


@pytest.fixture(scope="module")
def env():
    """(backend module, device): the compiled kernels on the GPU when there is one, else the interpreter."""
    if not INTERPRET:
        yield triton_backend, torch.device("cuda")
        return
    if _IMPORTED_COMPILED:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this test file on its own")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield triton_backend, torch.device("cpu")


def make_head(d: int, device, dtype=torch.float32, seed: int = 0):
    """Random (W1, b1, W2, b2) scaled like a trained head (logits of order 1), never zeros."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(2 * d, d, generator=g) / d**0.5
    b1 = torch.randn(2 * d, generator=g) * 0.1
    w2 = torch.randn(1, 2 * d, generator=g) / (2 * d) ** 0.5
    b2 = torch.randn(1, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (w1, b1, w2, b2)]


def randn(*shape, device, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def float64_logits(hidden, weights):
    w1, b1, w2, b2 = (t.double() for t in weights)
    return (torch.relu(hidden.double() @ w1.T + b1) @ w2.T + b2).squeeze(-1)


def torch_logits_in_dtype(hidden, weights):
    """Plain PyTorch in the inputs' dtype: the released nn.Sequential head."""
    w1, b1, w2, b2 = weights
    d = hidden.shape[-1]
    head = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, 1)).to(hidden.device, hidden.dtype)
    with torch.no_grad():
        head[0].weight.copy_(w1), head[0].bias.copy_(b1), head[2].weight.copy_(w2), head[2].bias.copy_(b2)
        return head(hidden).squeeze(-1).float()


def assert_within_torch_error(actual, expected64, torch_result):
    """flash-attention's rule: kernel error <= 2x PyTorch's own error in the same dtype (+ fp32 slack)."""
    kernel_error = (actual.double() - expected64).abs().max().item()
    torch_error = (torch_result.double() - expected64).abs().max().item()
    assert kernel_error <= 2 * torch_error + 1e-5, (kernel_error, torch_error)


def random_mask(batch: int, device, seed: int, fraction: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, generator=g) < fraction).to(device)


def pattern_mask(pattern: str, batch: int, device, seed: int) -> torch.Tensor:
    """A step mask of ``batch`` rows: "random" (about half), "none" or "all"."""
    if pattern == "random":
        return random_mask(batch, device, seed=seed)
    return torch.full((batch,), pattern == "all", dtype=torch.bool, device=device)


# ----- decode: head_logits_masked ----------------------------------------------------------------


@pytest.mark.parametrize("d", HIDDEN_SIZES)
@pytest.mark.parametrize("batch", ROW_COUNTS)
@pytest.mark.parametrize("pattern", ["random", "none", "all"])
def test_masked_matches_reference_fp32(env, d, batch, pattern):
    triton_ops, device = env
    weights = make_head(d, device, seed=d)
    hidden = randn(batch, d, device=device, seed=batch)
    mask = pattern_mask(pattern, batch, device, seed=d + batch)
    out = triton_ops.head_logits_masked(hidden, mask, *weights)
    expected = reference.head_logits_masked(hidden, mask, *weights)
    assert out.dtype == torch.float32 and out.shape == (batch,)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    assert torch.all(out[~mask] == 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [59, 96])
def test_masked_16bit_within_torch_error(env, dtype, d):
    triton_ops, device = env
    weights = make_head(d, device, dtype=dtype, seed=3)
    hidden = randn(17, d, device=device, dtype=dtype, seed=4)
    mask = random_mask(17, device, seed=5)
    out = triton_ops.head_logits_masked(hidden, mask, *weights)
    expected = torch.where(mask, float64_logits(hidden, weights), 0.0)
    eager = torch.where(mask, torch_logits_in_dtype(hidden, weights), 0.0)
    assert_within_torch_error(out, expected, eager)


def test_masked_writes_into_out_and_ignores_rows_off_mask(env):
    """Rows that are not steps are never read: NaN there must not leak; every entry of out is written."""
    triton_ops, device = env
    weights = make_head(64, device)
    hidden = randn(17, 64, device=device)
    mask = random_mask(17, device, seed=7)
    hidden[~mask] = float("nan")
    out = torch.full((17,), float("nan"), device=device)
    returned = triton_ops.head_logits_masked(hidden, mask, *weights, out=out)
    assert returned is out
    expected = reference.head_logits_masked(torch.nan_to_num(hidden), mask, *weights)
    torch.testing.assert_close(out, expected, **FP32_TOL)


def test_masked_no_step_reads_no_weights(env):
    """A batch without a step row must not touch W1: a NaN W1 still gives exact zeros."""
    triton_ops, device = env
    w1, b1, w2, b2 = make_head(64, device)
    w1 = torch.full_like(w1, float("nan"))
    out = triton_ops.head_logits_masked(randn(3, 64, device=device), torch.zeros(3, dtype=torch.bool, device=device), w1, b1, w2, b2)
    assert torch.equal(out, torch.zeros(3, device=device))


def test_masked_strided_rows_and_determinism(env):
    triton_ops, device = env
    weights = make_head(59, device)
    buffer = randn(17, 80, device=device)
    hidden = buffer[:, 5:64]  # rows of stride 80: a slice of a larger decode buffer
    mask = random_mask(17, device, seed=11)
    first = triton_ops.head_logits_masked(hidden, mask, *weights)
    second = triton_ops.head_logits_masked(hidden, mask, *weights)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, reference.head_logits_masked(hidden.contiguous(), mask, *weights), **FP32_TOL)


def test_masked_more_steps_than_one_row_block(env):
    """More step rows than one block of rows: the kernel takes several passes over its W1 tile."""
    triton_ops, device = env
    weights = make_head(64, device)
    hidden = randn(70, 64, device=device)
    mask = random_mask(70, device, seed=13, fraction=0.9)
    out = triton_ops.head_logits_masked(hidden, mask, *weights)
    torch.testing.assert_close(out, reference.head_logits_masked(hidden, mask, *weights), **FP32_TOL)


def test_masked_two_launch_variant_and_repeated_calls(env):
    """The single-launch reduction (ticket counter) agrees with the two-launch one, each repeats its
    own bits, and the counter is back at 0 after every call (a stale ticket would skip the final sum)."""
    triton_ops, device = env
    from xbai_kernels.ops.triton import decode

    weights = make_head(64, device)
    hidden = randn(17, 64, device=device)
    base = decode.default_config(17, 64, device)
    two_launch = decode.DecodeConfig(**{**base.__dict__, "fused_reduction": False})
    for seed in range(3):
        mask = random_mask(17, device, seed=seed)
        fused = triton_ops.head_logits_masked(hidden, mask, *weights)
        assert torch.equal(fused, triton_ops.head_logits_masked(hidden, mask, *weights))
        assert int(decode._ticket(device)) == 0
        separate = decode.head_logits_masked(hidden, mask, *weights, config=two_launch)
        assert torch.equal(separate, decode.head_logits_masked(hidden, mask, *weights, config=two_launch))
        torch.testing.assert_close(fused, separate, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("d", [59, 96])
@pytest.mark.parametrize(("batch", "pattern"), [(1, "all"), (37, "random"), (37, "none"), (37, "all"), (70, "random")])
def test_masked_gathered_schedule_matches_reference(env, monkeypatch, d, batch, pattern):
    """The GEMM schedule for many step rows (compaction, packed kernel, scatter), at step counts that
    are not a multiple of its row tile, zero and all rows, and masks longer than one scan chunk."""
    triton_ops, device = env
    from xbai_kernels.ops.triton import gathered

    monkeypatch.setattr(gathered, "_SCAN_CHUNK", 16)  # 37 and 70 rows: a scan over several chunks
    weights = make_head(d, device, seed=d)
    hidden = randn(batch, d, device=device, seed=batch)
    mask = pattern_mask(pattern, batch, device, seed=d + batch)
    hidden[~mask] = float("nan")  # rows that are not steps are never read
    out = torch.full((batch,), float("nan"), device=device)
    returned = triton_ops.head_logits_masked(hidden, mask, *weights, out=out, schedule="gathered")
    assert returned is out
    expected = reference.head_logits_masked(torch.nan_to_num(hidden), mask, *weights)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    assert torch.all(out[~mask] == 0.0)
    assert torch.equal(out, triton_ops.head_logits_masked(hidden, mask, *weights, schedule="gathered"))


def test_masked_gathered_schedule_16bit_and_the_batch_that_chooses_it(env, monkeypatch):
    """16-bit inputs within PyTorch's own error; without a schedule, B decides (never the step count)."""
    triton_ops, device = env
    from xbai_kernels.ops.triton import decode

    weights = make_head(64, device, dtype=torch.bfloat16, seed=3)
    hidden = randn(33, 64, device=device, dtype=torch.bfloat16, seed=4)
    mask = random_mask(33, device, seed=5)
    out = triton_ops.head_logits_masked(hidden, mask, *weights, schedule="gathered")
    expected = torch.where(mask, float64_logits(hidden, weights), 0.0)
    assert_within_torch_error(out, expected, torch.where(mask, torch_logits_in_dtype(hidden, weights), 0.0))
    calls = []
    monkeypatch.setattr(decode, "masked_by_compaction", lambda *a, **k: calls.append(a[0].shape[0]) or a[6])
    monkeypatch.setattr(decode, "GATHERED_FROM_BATCH", 33)
    triton_ops.head_logits_masked(hidden[:32], mask[:32], *weights)
    triton_ops.head_logits_masked(hidden, mask, *weights)
    assert calls == [33]
    with pytest.raises(ValueError, match="schedule"):
        triton_ops.head_logits_masked(hidden, mask, *weights, schedule="fast")
    with pytest.raises(ValueError, match="RowsConfig"):
        triton_ops.head_logits_masked(hidden, mask, *weights, schedule="gathered", config=decode.default_config(33, 64, device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 40])
def test_masked_launch_variants_give_the_same_bits(env, dtype, d):
    """TMA-fed W1 writes the same bits as the plain kernel with the same reduction (the sum order is
    fixed by the tiles). Tiles of 12 units in 16 lanes (not a power of two) sum in another order, and
    the one- and two-launch reductions may round differently on a GPU (the compiler lays the tile
    sum out per kernel): never by more than fp32 rounding. Batches with none, some and all rows steps, more steps than one row block
    (d = 40: a K tail that TMA zero-fills)."""
    triton_ops, device = env
    from xbai_kernels.ops.triton import decode

    weights = make_head(d, device, dtype)
    hidden = randn(70, d, device=device).to(dtype)
    variants = [
        decode.DecodeConfig(16, 16, 32, 4, 2, fused, units, tma)
        for fused in (True, False) for units in (None, 12) for tma in (False, True)
    ]
    for mask in (torch.zeros(70, dtype=torch.bool, device=device), random_mask(70, device, seed=1),
                 torch.ones(70, dtype=torch.bool, device=device)):
        expected = reference.head_logits_masked(hidden, mask, *weights)
        outs = [decode.head_logits_masked(hidden, mask, *weights, config=cfg) for cfg in variants]
        for cfg, out in zip(variants, outs):
            if cfg.tile_units is None:
                assert torch.equal(out, outs[0] if cfg.fused_reduction else outs[len(variants) // 2]), cfg
            torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(outs[0], expected, atol=2e-2, rtol=2e-2)
        assert int(decode._ticket(device)) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_tma_fed_w1_gives_the_same_bits(env, dtype):
    """W1 through a TMA descriptor (d = 40: a K tail the descriptor zero-fills) equals pointer loads."""
    triton_ops, device = env
    from xbai_kernels.ops.triton import packed

    for d in (64, 40):
        weights = make_head(d, device, dtype)
        hidden = randn(60, d, device=device).to(dtype)
        rows = torch.tensor([5, 0, 59, 17, 17, 33, 2, 8, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], device=device)
        plain = packed.head_logits_rows(hidden, rows, *weights, config=packed.RowsConfig(16, 32, 16, 2, 4, 1))
        tma = packed.head_logits_rows(hidden, rows, *weights, config=packed.RowsConfig(16, 32, 16, 2, 4, 1, w1_tma=True))
        assert torch.equal(plain, tma)
        torch.testing.assert_close(plain, reference.head_logits_rows(hidden, rows, *weights), atol=2e-2, rtol=2e-2)


def test_masked_sum_block_shapes(env):
    """The fused tail's load block (sum_tiles x sum_rows) changes only the order of a fixed-order sum;
    a block that is not a power of two is refused before any launch."""
    triton_ops, device = env
    from xbai_kernels.ops.triton import decode

    weights = make_head(64, device)
    hidden = randn(40, 64, device=device)
    mask = random_mask(40, device, seed=4)
    expected = reference.head_logits_masked(hidden, mask, *weights)
    for tiles, rows in ((2, 2), (8, 16), (16, 64)):
        cfg = decode.DecodeConfig(16, 16, 32, 4, 2, sum_tiles=tiles, sum_rows=rows)
        torch.testing.assert_close(decode.head_logits_masked(hidden, mask, *weights, config=cfg), expected, **FP32_TOL)
    with pytest.raises(ValueError, match="sum_tiles must be a power of two"):
        decode.head_logits_masked(hidden, mask, *weights, config=decode.DecodeConfig(16, 16, 32, 4, 2, sum_tiles=24))


def test_masked_rejects_bad_inputs(env):
    triton_ops, device = env
    weights = make_head(64, device)
    hidden = randn(4, 64, device=device)
    with pytest.raises(TypeError, match="row_mask"):
        triton_ops.head_logits_masked(hidden, torch.ones(4, dtype=torch.int64, device=device), *weights)
    with pytest.raises(ValueError, match="row_mask has 3 entries"):
        triton_ops.head_logits_masked(hidden, torch.ones(3, dtype=torch.bool, device=device), *weights)
    with pytest.raises(ValueError, match="out must be"):
        triton_ops.head_logits_masked(
            hidden, torch.ones(4, dtype=torch.bool, device=device), *weights, out=torch.empty(5, device=device)
        )
    with pytest.raises(ValueError, match="w1"):
        triton_ops.head_logits_masked(hidden, torch.ones(4, dtype=torch.bool, device=device), *make_head(32, device))


# ----- packed: head_logits_rows / head_logits ------------------------------------------------------


@pytest.mark.parametrize("d", HIDDEN_SIZES)
@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_rows_matches_reference_fp32(env, d, n, index_dtype):
    triton_ops, device = env
    weights = make_head(d, device, seed=d + 1)
    hidden = randn(40, d, device=device, seed=n)
    g = torch.Generator().manual_seed(n + d)
    rows = torch.randint(0, 40, (n,), generator=g).to(device=device, dtype=index_dtype)  # unsorted, repeats
    out = triton_ops.head_logits_rows(hidden, rows, *weights)
    torch.testing.assert_close(out, reference.head_logits_rows(hidden, rows, *weights), **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_16bit_within_torch_error(env, dtype):
    triton_ops, device = env
    weights = make_head(96, device, dtype=dtype, seed=8)
    hidden = randn(50, 96, device=device, dtype=dtype, seed=9)
    rows = torch.tensor([49, 0, 7, 7, 21, 33, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 40], device=device)
    out = triton_ops.head_logits_rows(hidden, rows, *weights)
    assert_within_torch_error(out, float64_logits(hidden[rows], weights), torch_logits_in_dtype(hidden[rows], weights))


def test_rows_mixed_dtypes_and_empty(env):
    triton_ops, device = env
    weights = make_head(64, device, dtype=torch.bfloat16)
    hidden = randn(10, 64, device=device)  # fp32 hidden, bf16 head: computed in fp32
    rows = torch.tensor([3, 1], device=device)
    torch.testing.assert_close(
        triton_ops.head_logits_rows(hidden, rows, *weights), reference.head_logits_rows(hidden, rows, *weights), **FP32_TOL
    )
    empty = triton_ops.head_logits_rows(hidden, rows[:0], *weights)
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_head_logits_every_row(env):
    triton_ops, device = env
    weights = make_head(59, device)
    hidden = randn(17, 59, device=device)
    torch.testing.assert_close(triton_ops.head_logits(hidden, *weights), reference.head_logits(hidden, *weights), **FP32_TOL)


def test_rows_deterministic(env):
    triton_ops, device = env
    weights = make_head(64, device)
    hidden = randn(30, 64, device=device)
    rows = torch.arange(0, 30, 2, device=device)
    assert torch.equal(triton_ops.head_logits_rows(hidden, rows, *weights), triton_ops.head_logits_rows(hidden, rows, *weights))


def test_rows_rejects_bad_inputs(env):
    triton_ops, device = env
    weights = make_head(64, device)
    hidden = randn(4, 64, device=device)
    with pytest.raises(TypeError, match="rows"):
        triton_ops.head_logits_rows(hidden, torch.zeros(2, device=device), *weights)
    with pytest.raises(ValueError, match="hidden"):
        triton_ops.head_logits_rows(hidden[0], torch.zeros(2, dtype=torch.int64, device=device), *weights)
