"""Device functions shared by the three kernel families, and the fixed-order reduction kernel.

Every head kernel splits the 2d hidden units of W1 into tiles; a program owns one tile of units and
some rows, and writes the partial logit sum_u W2[u] * act[row, u] of its units in fp32. The partials
[num_unit_tiles, rows] are summed by ``sum_partials_kernel`` in a fixed order, so results are
bitwise reproducible (no float atomics, whose order depends on scheduling).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chain_start(USE_PDL: tl.constexpr):
    """First statement of a kernel launched with ``_launch.chained``: wait until the kernel before it
    on the stream has finished and its writes are visible, then let the next kernel launch (it waits
    in turn). Without USE_PDL, nothing."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def preactivation_tile(
    hidden_ptr,
    stride_row,
    rows,
    row_ok,
    w1,
    unit0,
    units,
    unit_ok,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    W1_DESC: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N]: sum_k hidden[rows[m], k] * W1[units[u], k].

    rows int [BLOCK_M] index hidden's rows (row stride ``stride_row``, elements contiguous);
    units = unit0 + arange(BLOCK_N) index W1's rows (W1 contiguous [2d, d]). Masked rows/units read
    nothing. With W1_DESC, ``w1`` is a tensor descriptor of W1 with block [BLOCK_N, BLOCK_K]: on Hopper
    its tiles arrive by TMA, one instruction per tile instead of per-thread address math and
    predicates, which is what bounds a stream of W1 when few rows share it (zero-filled past the end).
    """
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_row + ks[None, :]
    if not W1_DESC:
        w_ptrs = w1 + units.to(tl.int64)[:, None] * d + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=row_ok[:, None] & ((k0 + ks) < d)[None, :], other=0.0)
        if W1_DESC:
            w = w1.load([unit0, k0])
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=unit_ok[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=unit_ok[:, None] & ((k0 + ks) < d)[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        if not W1_DESC:
            w_ptrs += BLOCK_K
    return acc


@triton.jit
def relu_bias(acc, b1_ptr, units, unit_ok):
    """relu(acc + b1[units]) in fp32; SPEC's ReLU sits between W1 and the dropout."""
    b1 = tl.load(b1_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)
    return tl.maximum(acc + b1[None, :], 0.0)


@triton.jit
def dropout_keep(seed, rows, unit0, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: whether dropout keeps unit ``unit0 + u`` of row ``rows[m]``.

    One Philox4x32-10 call per (row, group of 4 consecutive units) gives the 4 units of the group
    their uniforms (a quarter of the Philox work of one call per element), and the draw depends only
    on (seed, row, unit): forward, backward and any tile shape see the same mask. ``unit0`` is a
    multiple of 4.
    """
    quads = unit0 // 4 + tl.arange(0, BLOCK_N // 4)
    c0 = tl.broadcast_to(quads[None, :], [BLOCK_M, BLOCK_N // 4]).to(tl.uint32)
    c1 = tl.broadcast_to(rows[:, None], [BLOCK_M, BLOCK_N // 4]).to(tl.uint32)
    zero = tl.zeros([BLOCK_M, BLOCK_N // 4], dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # Unit 4q + 2b + a of the tile takes output r_{2a+b}: a fixed bijection, the same everywhere.
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK_M, BLOCK_N])
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def sum_tiles(partial_ptr, num_tiles, n, offs, wanted, TILE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 [BLOCK]: sum_t partial[t, offs] over t < num_tiles, in a fixed order (chunks of TILE_BLOCK
    tiles, each a fixed reduction tree). Entries where ``wanted`` is false read nothing."""
    tiles = tl.arange(0, TILE_BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for t0 in range(0, num_tiles, TILE_BLOCK):
        ptrs = partial_ptr + (t0 + tiles).to(tl.int64)[:, None] * n + offs[None, :]
        # .cg: partials written by other programs of the same launch must come from L2, never L1.
        chunk = tl.load(ptrs, mask=((t0 + tiles) < num_tiles)[:, None] & wanted[None, :], other=0.0,
                        cache_modifier=".cg")
        total += tl.sum(chunk, axis=0)
    return total


@triton.jit
def write_logits(partial_ptr, num_tiles, b2_ptr, row_mask_ptr, out_ptr, n, live_ptr, first,
                 HAS_MASK: tl.constexpr, HAS_LIVE: tl.constexpr, TILE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_t partial[t, i] + b2 for i in [first, first + BLOCK) (0.0 off ``row_mask`` and
    at i >= *live_ptr)."""
    offs = first + tl.arange(0, BLOCK)
    in_range = offs < n
    wanted = in_range
    if HAS_MASK:
        wanted = in_range & (tl.load(row_mask_ptr + offs, mask=in_range, other=0) != 0)
    if HAS_LIVE:
        wanted = wanted & (offs < tl.load(live_ptr))
    result = sum_tiles(partial_ptr, num_tiles, n, offs, wanted, TILE_BLOCK, BLOCK) + tl.load(b2_ptr).to(tl.float32)
    tl.store(out_ptr + offs, tl.where(wanted, result, 0.0), mask=in_range)


@triton.jit
def sum_partials_kernel(
    partial_ptr,
    num_tiles,
    b2_ptr,
    row_mask_ptr,
    out_ptr,
    n,
    live_ptr,
    HAS_MASK: tl.constexpr,
    HAS_LIVE: tl.constexpr,
    TILE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[i] = sum_t partial[t, i] + b2 (0.0 where ``row_mask[i]`` is 0 when HAS_MASK, and at
    i >= *live_ptr when HAS_LIVE).

    partial fp32 [num_tiles, n] contiguous; the sum runs in a fixed order, so the result is the same
    bits every run.
    """
    chain_start(USE_PDL)
    write_logits(partial_ptr, num_tiles, b2_ptr, row_mask_ptr, out_ptr, n, live_ptr, tl.program_id(0) * BLOCK,
                 HAS_MASK, HAS_LIVE, TILE_BLOCK, BLOCK)
