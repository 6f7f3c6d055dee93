"""DecodeScorer's per-step bookkeeping kernels (ops/triton/record.py, csrc/decode_record.cu) against
the reference ops.

Random decode steps over a pool of slots, with step ids, both markers, unknown current tokens and
slots at capacity; the whole scorer state after each step must equal the reference's bit for bit.
The Triton kernels also run under Triton's interpreter without a GPU (see ``test_triton_ops``); the
CUDA ones need a GPU and the built module.
"""

from __future__ import annotations

import pytest
import torch

from test_triton_ops import env  # noqa: F401  (fixture)
from xbai_kernels.ops import reference

THINK_START, THINK_END = 3, 4
NUM_SLOTS, CAPACITY = 9, 5


@pytest.fixture(params=["triton", pytest.param("cuda", marks=pytest.mark.cuda)])
def record_env(request):
    """(backend module, device) of each backend that implements the bookkeeping ops here."""
    if request.param == "triton":
        return request.getfixturevalue("env")
    from xbai_kernels.ops import cuda as cuda_ops

    reason = cuda_ops.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return cuda_ops, torch.device("cuda")


def _random_step(generator, batch, vocab, device):
    slots = torch.randperm(NUM_SLOTS, generator=generator)[:batch]
    sampled = torch.randint(0, vocab, (batch,), generator=generator)
    positions = torch.randint(1, 200, (batch,), generator=generator)
    logits = torch.randn(batch, generator=generator)
    return [t.to(device) for t in (slots, sampled, positions, logits)]


@pytest.mark.parametrize("step_ids", [(7,), (7, 8, 9), tuple(range(10, 80))])  # one, few, more than a chunk
@pytest.mark.parametrize("batch", [1, 5, 9])
def test_record_matches_reference(record_env, step_ids, batch):
    backend, device = record_env
    generator = torch.Generator().manual_seed(batch * 100 + len(step_ids))
    step_ids = torch.tensor(step_ids, dtype=torch.int64, device=device)
    # Sampled ids run past the end of the step table: those are not step tokens.
    vocab = int(step_ids.max()) + 3
    step_table = torch.zeros(int(step_ids.max()) + 1, dtype=torch.bool, device=device)
    step_table[step_ids] = True
    state = {
        "events": torch.zeros(NUM_SLOTS, CAPACITY + 1, dtype=torch.int64),
        "event_logits": torch.zeros(NUM_SLOTS, CAPACITY + 1),
        "counts": torch.zeros(NUM_SLOTS, dtype=torch.int64),
        "last_token": torch.full((NUM_SLOTS,), reference.NO_TOKEN, dtype=torch.int64),
    }
    ours = {k: v.clone().to(device) for k, v in state.items()}
    oracle = {k: v.clone().to(device) for k, v in state.items()}
    for _ in range(40):  # enough steps to fill some slots past capacity
        slots, sampled, positions, logits = _random_step(generator, batch, vocab, device)
        # Markers and step tokens often, so every branch runs.
        sampled = torch.where(positions % 5 == 0, THINK_START, torch.where(positions % 7 == 0, THINK_END, sampled))
        expected = reference.decode_candidates(oracle["last_token"], sampled, slots, step_table, THINK_START)
        got = backend.decode_candidates(ours["last_token"], sampled, slots, step_table, THINK_START)
        assert torch.equal(got, expected)
        masked = torch.where(expected, logits, 0.0)
        reference.decode_record(*oracle.values(), slots, positions, sampled, expected, masked, THINK_START, THINK_END)
        backend.decode_record(*ours.values(), slots, positions, sampled, got, masked, THINK_START, THINK_END)
        for name in state:
            # The trash column holds whatever the last non-recording row wrote: compare the kept events.
            if name in ("events", "event_logits"):
                assert torch.equal(ours[name][:, :CAPACITY], oracle[name][:, :CAPACITY]), name
            else:
                assert torch.equal(ours[name], oracle[name]), name
    assert int(oracle["counts"].max()) > CAPACITY, "the test should overflow a slot"


def test_record_rejects_bad_inputs(record_env):
    backend, device = record_env
    last_token = torch.zeros(4, dtype=torch.int64, device=device)
    table = torch.zeros(8, dtype=torch.bool, device=device)
    rows = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="sampled"):
        backend.decode_candidates(last_token, torch.zeros(2, device=device), rows, table, 3)
    with pytest.raises(ValueError, match="slots"):
        backend.decode_candidates(last_token, rows, torch.zeros(3, dtype=torch.int64, device=device), table, 3)
    with pytest.raises(TypeError, match="step_table"):
        backend.decode_candidates(last_token, rows, rows, torch.tensor([7], device=device), 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_scorer_step_in_cuda_graph_matches_cpu_reference(monkeypatch, backend):
    """A whole DecodeScorer.step (candidates, head, record) captured once and replayed on new tokens
    records what the CPU reference scorer records for the same steps."""
    import xbai_kernels as xk
    from xbai_kernels.ops import cuda as cuda_ops

    if backend == "cuda" and cuda_ops.unavailable_reason() is not None:
        pytest.skip(cuda_ops.unavailable_reason())
    monkeypatch.setenv("XBAI_KERNELS_BACKEND", backend)
    batch, d, steps = 16, 1536, 24
    rule = xk.StepRule((13, 14), THINK_START, THINK_END)
    # The CUDA head kernels take 16-bit inputs; the CPU reference gets the same values in float32.
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    head_gpu = xk.SPRMHead(d).to("cuda", dtype).eval()
    head_cpu = xk.SPRMHead(d).eval()
    head_cpu.load_state_dict({name: value.float().cpu() for name, value in head_gpu.state_dict().items()})
    gpu = xk.DecodeScorer(head_gpu, rule, batch, capacity=steps + 1)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (steps, batch), generator=generator)
    hiddens = torch.randn(steps, batch, d, generator=generator).to(dtype).float()

    static = {
        "hidden": hiddens[0].to("cuda", dtype), "sampled": tokens[0].cuda(),
        "slots": torch.arange(batch, device="cuda"), "positions": torch.zeros(batch, dtype=torch.int64, device="cuda"),
    }
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile every kernel outside the capture, then undo its effect
        gpu.step(**{"sampled_ids" if k == "sampled" else k: v for k, v in static.items()})
    torch.cuda.current_stream().wait_stream(side)
    gpu.reset(list(range(batch)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gpu.step(static["hidden"], static["sampled"], static["slots"], static["positions"])
    gpu.reset(list(range(batch)))

    monkeypatch.setenv("XBAI_KERNELS_BACKEND", "reference")
    cpu = xk.DecodeScorer(head_cpu, rule, batch, capacity=steps + 1)
    for t in range(steps):
        static["hidden"].copy_(hiddens[t])
        static["sampled"].copy_(tokens[t])
        static["positions"].fill_(t)
        graph.replay()
        cpu.step(hiddens[t], tokens[t], torch.arange(batch), torch.full((batch,), t))
    for slot in range(batch):
        ours, expected = gpu.result(slot), cpu.result(slot)
        assert torch.equal(ours.positions, expected.positions), slot
        torch.testing.assert_close(ours.logits, expected.logits, atol=1e-4, rtol=1e-4)


STEP_IDS = (5, 6)


BLOCK_SIZE = 4


def _engine_step(generator, device, max_requests=6, slots_total=8, columns=48, vocab=12):
    """A random Model Runner V2 step: requests of 1-5 rows at random positions of random table rows,
    the token table holding each request's tokens (the one after its last row included), each row's
    KV-cache slot, padding rows (slot -1, as vLLM pads)."""
    live = int(torch.randint(1, max_requests + 1, (1,), generator=generator))
    lengths = torch.randint(1, 6, (live,), generator=generator)
    table_rows = torch.randperm(slots_total, generator=generator)[:live]
    token_ids = torch.randint(0, vocab, (slots_total, columns), generator=generator, dtype=torch.int32)
    token_ids[token_ids == 7] = THINK_START  # markers occur too
    firsts = [int(torch.randint(0, columns - int(n) - 1, (1,), generator=generator)) for n in lengths]
    input_ids, positions, cache_slots = [], [], []
    for row, first, n in zip(table_rows.tolist(), firsts, lengths.tolist()):
        input_ids += token_ids[row, first : first + n].tolist()
        positions += list(range(first, first + n))
        cache_slots += [1000 * row + p for p in range(first, first + n)]
    padding = int(torch.randint(0, 4, (1,), generator=generator))
    input_ids += torch.randint(0, vocab, (padding,), generator=generator).tolist()
    positions += [0] * padding
    cache_slots += [-1] * padding
    bounds = [0] + torch.cumsum(lengths, 0).tolist()
    query_start_loc = bounds + [bounds[-1]] * (max_requests - live)
    all_rows = table_rows.tolist() + [0] * (max_requests - live)
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    tensors = dict(
        input_ids=as_int32(input_ids), positions=torch.tensor(positions, device=device),
        cache_slots=torch.tensor(cache_slots, device=device), query_start_loc=as_int32(query_start_loc),
        table_rows=as_int32(all_rows), token_ids=token_ids.to(device),
    )
    # SPEC rules 1 and 2, row by row, from the token table; block ends kept too. Padding rows keep
    # nothing and name slot 0.
    expected_keep = [False] * len(input_ids)
    expected_slots = [0] * len(input_ids)
    for r, (row, first, n) in enumerate(zip(table_rows.tolist(), firsts, lengths.tolist())):
        for k in range(n):
            position = first + k
            current, following = token_ids[row, position].item(), token_ids[row, position + 1].item()
            opens = following in STEP_IDS and current not in STEP_IDS and current != THINK_START
            expected_keep[bounds[r] + k] = opens or (position + 1) % BLOCK_SIZE == 0
            expected_slots[bounds[r] + k] = cache_slots[bounds[r] + k]
    return tensors, (expected_keep, expected_slots)


def test_engine_step_rows_matches_the_rule_row_by_row(env):
    backend, device = env  # Triton and reference only: the CUDA module has no engine_step_rows
    generator = torch.Generator().manual_seed(7)
    table = torch.zeros(12, dtype=torch.bool)
    table[list(STEP_IDS)] = True
    for _ in range(40):
        tensors, (expected_keep, expected_slots) = _engine_step(generator, device)
        rows = tensors["input_ids"].shape[0]
        for ops in (reference, backend):
            keep = torch.ones(rows, dtype=torch.bool, device=device)
            out_slots = torch.full((rows,), 7, dtype=torch.int32, device=device)
            ops.engine_step_rows(*tensors.values(), table.to(device), THINK_START, BLOCK_SIZE, keep, out_slots)
            assert out_slots.cpu().tolist() == expected_slots, ops.__name__
            assert keep.cpu().tolist() == expected_keep, ops.__name__


def test_engine_step_rows_rejects_mismatched_buffers(env):
    backend, device = env
    ids = torch.zeros(4, dtype=torch.int32, device=device)
    table = torch.zeros(12, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="engine_step_rows: query_start_loc must be a contiguous \\[3\\] tensor"):
        backend.engine_step_rows(ids, ids.long(), ids.long(), ids[:2], ids[:2], ids.view(2, 2), table, THINK_START,
                                 BLOCK_SIZE, ids.bool(), ids)


def test_staging_copy_moves_int32_both_ways(env):
    """The recorder's kernel copy (pinned host <-> device on a GPU; CPU tensors under the interpreter)."""
    from xbai_kernels.ops.triton.staging import copy_int32

    _, device = env
    host = torch.arange(2500, dtype=torch.int32).pin_memory() if device.type == "cuda" else torch.arange(2500, dtype=torch.int32)
    on_device = torch.zeros(2500, dtype=torch.int32, device=device)
    copy_int32(host, on_device)
    back = torch.zeros_like(host).pin_memory() if device.type == "cuda" else torch.zeros_like(host)
    copy_int32(on_device * 2, back)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(back, host * 2)
    with pytest.raises(ValueError, match="copy_int32: needs two int32 tensors of one size"):
        copy_int32(host, on_device[:10])
    # With keep: the last len(keep) values become fill where keep is False, the rest copied as is
    # (across a block boundary: 2500 values, the masked tail from 1100 on).
    keep = torch.rand(1400, generator=torch.Generator().manual_seed(0)) < 0.3
    copy_int32(on_device, back, keep.to(device), fill=-7)
    if device.type == "cuda":
        torch.cuda.synchronize()
    want = host.clone()
    want[1100:][~keep] = -7
    assert torch.equal(back, want)
    with pytest.raises(ValueError, match="copy_int32: keep must be a contiguous bool"):
        copy_int32(on_device, back, torch.ones(2600, dtype=torch.bool, device=device))
