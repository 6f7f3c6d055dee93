"""The per-step device update the plugin runs inside vLLM's model runner, alone (no vLLM needed).

A packed step of three requests: a partial prefill chunk (its sample is thrown away, the next
prompt token follows it), a decode row, and a final prefill chunk. On the GPU the same update runs
under ``torch.cuda.set_sync_debug_mode("error")`` and inside a captured CUDA graph.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xbai_kernels import SPRMHead, StepRule
from xbai_kernels.ops import reference
from xbai_kernels.vllm import records
from xbai_kernels.vllm.recorder import HOST_RING, StepLogitRecorder
from xbai_kernels.vllm.runtime import SPRMRuntime
from xbai_kernels.vllm.runner_v1 import _host_records, _run_update, _StepLayout

STEP, THINK, END_THINK = 5, 1, 2
RULE = StepRule((STEP, 6), THINK, END_THINK)
VOCAB = 16
HIDDEN = 24
BLOCK_SIZE = 4  # rows 1 and 10 end a KV block without opening a step

# Request 0: partial prefill at positions 10..15, followed by prompt token STEP.
# Request 1: one decode token at position 40, sampled STEP.
# Request 2: final prefill chunk at positions 0..3, sampled 7.
INPUT_IDS = [3, STEP, 4, THINK, 9, 8] + [11] + [THINK, 3, STEP, STEP]
QUERY_START_LOC = [0, 6, 7, 11]
FIRST_POSITIONS = [10, 40, 0]
DISCARD = [True, False, False]
NEXT_PROMPT_IDS = [STEP, 0, 0]
SAMPLED = [13, STEP, 7]
POSITIONS = [FIRST_POSITIONS[r] + k for r in range(3) for k in range(QUERY_START_LOC[r + 1] - QUERY_START_LOC[r])]
# Each row's KV-cache slot: request r's position p sits at 100 r + p.
CACHE_SLOTS = [100 * r + FIRST_POSITIONS[r] + k for r in range(3) for k in range(QUERY_START_LOC[r + 1] - QUERY_START_LOC[r])]


def _kept_rows() -> list[int]:
    """The rows that keep their logit, straight from SPEC's rules 1 and 2 plus the block-end rule."""
    kept = []
    for request in range(3):
        lo, hi = QUERY_START_LOC[request], QUERY_START_LOC[request + 1]
        tokens = INPUT_IDS[lo:hi] + [NEXT_PROMPT_IDS[request] if DISCARD[request] else SAMPLED[request]]
        for k in range(hi - lo):
            opens = tokens[k + 1] in RULE.step_token_ids and tokens[k] not in RULE.step_token_ids and tokens[k] != THINK
            if opens or (POSITIONS[lo + k] + 1) % BLOCK_SIZE == 0:
                kept.append(lo + k)
    return kept


def _check(rows: np.ndarray, hidden: torch.Tensor, weights) -> None:
    """rows (``records``' layout) name every real row's slot; kept rows carry the head's logit, the
    others NaN."""
    slots, logits = records.decode(rows)
    assert slots.tolist() == CACHE_SLOTS
    kept = _kept_rows()
    assert np.flatnonzero(~np.isnan(logits)).tolist() == kept
    want = reference.head_logits(hidden[kept], *weights).float().cpu()
    torch.testing.assert_close(torch.from_numpy(logits[kept]), want, atol=1e-5, rtol=1e-5)


def _step(device: str):
    torch.manual_seed(0)
    head = SPRMHead(HIDDEN).to(device).eval()
    runtime = SPRMRuntime(head, RULE, VOCAB, max_tokens=32, max_requests=4, dtype=torch.float32, block_size=BLOCK_SIZE)
    runtime.hidden[: len(INPUT_IDS)] = torch.randn(len(INPUT_IDS), HIDDEN, device=device)
    def buffer(values, dtype=None):  # vLLM's CpuGpuBuffer: .np is the host copy's numpy view
        tensor = torch.tensor(values, dtype=dtype, device=device)
        return SimpleNamespace(gpu=tensor, np=tensor.cpu().numpy())

    slot_mapping = buffer(CACHE_SLOTS)
    runner = SimpleNamespace(
        input_ids=buffer(INPUT_IDS, torch.int32),
        positions=torch.tensor(POSITIONS, device=device),
        query_start_loc=SimpleNamespace(gpu=torch.tensor(QUERY_START_LOC, dtype=torch.int32, device=device)),
        discard_request_mask=SimpleNamespace(gpu=torch.tensor(DISCARD, device=device), np=np.array(DISCARD)),
        input_batch=SimpleNamespace(block_table=[SimpleNamespace(slot_mapping=slot_mapping)]),
    )
    layout = _StepLayout(
        num_requests=3,
        query_start_loc=np.array(QUERY_START_LOC),
        num_tokens=len(INPUT_IDS),
        next_prompt_ids=np.array(NEXT_PROMPT_IDS),
    )
    sampled = torch.tensor(SAMPLED, dtype=torch.int32, device=device)[:, None]
    return runtime, runner, layout, sampled


def test_step_records_on_cpu():
    runtime, runner, layout, sampled = _step("cpu")
    _run_update(runner, runtime, layout, sampled)
    _check(_host_records(layout), runtime.hidden, runtime.head.weights)


def test_a_decode_step_records_on_cpu():
    """One row per request (every row is its request's last): the token after each is the one sampled."""
    torch.manual_seed(0)
    head = SPRMHead(HIDDEN).eval()
    runtime = SPRMRuntime(head, RULE, VOCAB, max_tokens=32, max_requests=4, dtype=torch.float32, block_size=BLOCK_SIZE)
    runtime.hidden[:3] = torch.randn(3, HIDDEN)
    ids, positions, sampled = [3, STEP, 9], [6, 9, 21], [STEP, STEP, 4]
    # Row 0 opens a step; row 1, a step token followed by another, is inside a run and opens none;
    # row 2 is followed by no step token. No row ends a KV block of 4 (positions 6, 9, 21).
    slots = np.array([100, 200, 300])
    runner = SimpleNamespace(
        input_ids=SimpleNamespace(np=np.array(ids, dtype=np.int32)),
        positions=torch.tensor(positions),
        discard_request_mask=SimpleNamespace(np=np.zeros(3, dtype=bool)),
        input_batch=SimpleNamespace(block_table=[SimpleNamespace(slot_mapping=SimpleNamespace(np=slots))]),
    )
    layout = _StepLayout(num_requests=3, query_start_loc=np.array([0, 1, 2, 3]), num_tokens=3,
                         next_prompt_ids=np.zeros(3, dtype=np.int64))
    _run_update(runner, runtime, layout, torch.tensor(sampled, dtype=torch.int32)[:, None])
    got_slots, logits = records.decode(_host_records(layout))
    assert got_slots.tolist() == slots.tolist()
    assert np.flatnonzero(~np.isnan(logits)).tolist() == [0]
    want = reference.head_logits(runtime.hidden[:1], *head.weights)
    torch.testing.assert_close(torch.from_numpy(logits[:1]), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_cpu_engines_host_head_is_the_oracles(dtype):
    """``HostStep``: the oracle's float32 head on the kept rows of a model-dtype buffer, in numpy,
    and the step rule by lookups, equal to ``semantics.opens_step``."""
    from xbai_kernels import semantics
    from xbai_kernels.vllm.recorder import HostStep

    torch.manual_seed(0)
    head = SPRMHead(HIDDEN, dtype=dtype).eval()
    table = RULE.step_table("cpu", size=VOCAB).numpy()
    hidden = torch.randn(9, HIDDEN).to(dtype)
    host = HostStep(RULE, table, head.weights, hidden)
    rows = np.array([0, 4, 8])
    want = reference.head_logits(hidden[torch.from_numpy(rows)], *head.weights)
    torch.testing.assert_close(torch.from_numpy(host.logits(rows)), want, atol=1e-5, rtol=1e-5)
    current, following = np.array([3, STEP, THINK, 7, 3]), np.array([STEP, 6, STEP, 9, -1])
    assert host.opens(current, following).tolist() == semantics.opens_step(current, following, table, THINK).tolist()


def test_recorder_rejects_oversized_steps():
    recorder = StepLogitRecorder(SPRMHead(HIDDEN).eval(), RULE, VOCAB, max_tokens=4, max_requests=2, block_size=16)
    ids = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="exceeds the buffers"):
        recorder.update(torch.zeros(5, HIDDEN), ids, ids, ids[:1], ids[:1], ids[:1].bool(), ids[:1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_update_has_no_host_sync_and_replays_in_a_cuda_graph():
    runtime, runner, layout, sampled = _step("cuda")
    _run_update(runner, runtime, layout, sampled)  # warm-up: kernel compilation, backend choice
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_update(runner, runtime, layout, sampled)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(_host_records(layout), runtime.hidden, runtime.head.weights)

    # The device part in a CUDA graph, as under vLLM's full-graph capture: fixed buffers, replayed.
    recorder = runtime.recorder
    num_tokens = len(INPUT_IDS)
    arguments = (runtime.hidden[:num_tokens], runner.input_ids.gpu, runner.positions, runner.query_start_loc.gpu[1:] - 1,
                 sampled[:, 0], runner.discard_request_mask.gpu, runtime.next_prompt_ids[:3])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        recorder.update(*arguments)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep, logits = recorder.update(*arguments)
    runtime.hidden[:num_tokens].normal_()
    keep.zero_()
    graph.replay()
    torch.cuda.synchronize()
    slots = np.array(CACHE_SLOTS)
    kept = np.flatnonzero(keep.cpu().numpy())
    _check(records.encode(slots, kept, logits.cpu().numpy()[kept]), runtime.hidden, runtime.head.weights)


# The same step under Model Runner V2: the token table holds each request's tokens by table row
# (the next prompt token of the partial chunk, and the sampled ones, included); rows past the
# step's 11 tokens are graph padding (slot -1, as vLLM pads), and the layout is padded to 5 requests.
TABLE_ROWS = [2, 0, 1]
PADDED_ROWS = 16


def _engine_step(device: str):
    from xbai_kernels.vllm.recorder import EngineStepRecorder

    torch.manual_seed(0)
    head = SPRMHead(HIDDEN).to(device).eval()
    recorder = EngineStepRecorder(head, RULE, VOCAB, max_tokens=32, max_requests=5, block_size=BLOCK_SIZE)
    token_ids = torch.full((4, 64), 9, dtype=torch.int32)
    for request, table_row in enumerate(TABLE_ROWS):
        lo, hi = QUERY_START_LOC[request], QUERY_START_LOC[request + 1]
        first = FIRST_POSITIONS[request]
        token_ids[table_row, first : first + hi - lo] = torch.tensor(INPUT_IDS[lo:hi])
        token_ids[table_row, first + hi - lo] = NEXT_PROMPT_IDS[request] if DISCARD[request] else SAMPLED[request]
    padding = PADDED_ROWS - len(INPUT_IDS)
    inputs = dict(
        hidden=torch.randn(PADDED_ROWS, HIDDEN, device=device),
        input_ids=torch.tensor(INPUT_IDS + [STEP] * padding, dtype=torch.int32, device=device),
        positions=torch.tensor(POSITIONS + [0] * padding, device=device),
        cache_slots=torch.tensor(CACHE_SLOTS + [-1] * padding, device=device),
        # vLLM's own buffer: max_requests + 1 entries, padded with the row count.
        query_start_loc=torch.tensor(
            QUERY_START_LOC + [len(INPUT_IDS)] * (5 + 1 - len(QUERY_START_LOC)), dtype=torch.int32, device=device
        ),
        token_ids=token_ids.to(device),
    )
    return recorder, inputs


def _check_engine(recorder, inputs, step) -> None:
    _check(step.rows(), inputs["hidden"], recorder.weights)


LAYOUT = dict(table_rows=np.array(TABLE_ROWS), num_rows=len(INPUT_IDS))


def test_engine_step_records_on_cpu():
    recorder, inputs = _engine_step("cpu")
    _check_engine(recorder, inputs, recorder.record(**inputs, **LAYOUT, num_padded_rows=PADDED_ROWS))


def test_engine_recorder_rejects_oversized_steps():
    recorder, inputs = _engine_step("cpu")
    with pytest.raises(ValueError, match="a step of 40 rows / 3 requests exceeds the buffers \\(32 / 5\\)"):
        recorder.record(**inputs, **{**LAYOUT, "num_rows": 40}, num_padded_rows=40)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_step_replays_a_captured_graph_without_host_sync():
    recorder, inputs = _engine_step("cuda")
    assert recorder.capture([8, PADDED_ROWS, 64], **inputs) == 2  # 64 exceeds the buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replayed = recorder.record(**inputs, **LAYOUT, num_padded_rows=PADDED_ROWS)
        eager = recorder.record(**inputs, **LAYOUT, num_padded_rows=12)  # no graph for 12 rows: eager
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check_engine(recorder, inputs, replayed)
    _check_engine(recorder, inputs, eager)
    # Around the ring and past it, reading only the last step: a turn whose step nobody read is
    # waited for before its buffers are reused.
    steps = [recorder.record(**inputs, **LAYOUT, num_padded_rows=PADDED_ROWS) for _ in range(2 * HOST_RING + 1)]
    _check_engine(recorder, inputs, steps[-1])
    assert (recorder.replayed_steps, recorder.eager_steps) == (2 * HOST_RING + 2, 1)
    # A graph never runs on buffers other than those it captured.
    moved = {**inputs, "input_ids": inputs["input_ids"].clone()}
    _check_engine(recorder, inputs, recorder.record(**moved, **LAYOUT, num_padded_rows=PADDED_ROWS))
    assert recorder.eager_steps == 2


def test_v2_inputs_are_the_same_tensors_at_every_step():
    """The V2 recorder replays a graph only for the tensors it captured, checked by identity. V2's slot
    mapping is row 0 of a [groups, tokens] tensor, and indexing makes a new view each time: the
    runner patch must hand over one view per tensor, or every step would run eagerly."""
    from xbai_kernels.vllm.runner_v2 import _engine_inputs

    slot_mappings = torch.zeros(1, 16, dtype=torch.int64)
    runner = SimpleNamespace(
        input_buffers=SimpleNamespace(
            input_ids=torch.zeros(16, dtype=torch.int32),
            positions=torch.zeros(16, dtype=torch.int64),
            query_start_loc=torch.zeros(5, dtype=torch.int32),
        ),
        block_tables=SimpleNamespace(slot_mappings=slot_mappings),
        req_states=SimpleNamespace(all_token_ids=SimpleNamespace(gpu=torch.zeros(4, 32, dtype=torch.int32))),
    )
    first, second = _engine_inputs(runner), _engine_inputs(runner)
    assert all(a is b for a, b in zip(first, second))
    assert first[2].data_ptr() == slot_mappings.data_ptr() and first[2].shape == (16,)
    runner.block_tables.slot_mappings = torch.zeros(1, 16, dtype=torch.int64)  # a new tensor: a new view
    third = _engine_inputs(runner)
    assert third[2] is not first[2] and third[2].data_ptr() == runner.block_tables.slot_mappings.data_ptr()
