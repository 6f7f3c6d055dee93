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
from xbai_kernels.vllm.recorder import StepLogitRecorder
from xbai_kernels.vllm.runtime import SPRMRuntime
from xbai_kernels.vllm.runner_v1 import _host_records, _run_update, _StepLayout

STEP, THINK, END_THINK = 5, 1, 2
RULE = StepRule((STEP, 6), THINK, END_THINK)
VOCAB = 16
HIDDEN = 24

# Request 0: partial prefill at positions 10..15, followed by prompt token STEP.
# Request 1: one decode token at position 40, sampled STEP.
# Request 2: final prefill chunk at positions 0..3, sampled 7.
INPUT_IDS = [3, STEP, 4, THINK, 9, 8] + [11] + [THINK, 3, STEP, STEP]
QUERY_START_LOC = [0, 6, 7, 11]
FIRST_POSITIONS = [10, 40, 0]
DISCARD = [True, False, False]
NEXT_PROMPT_IDS = [STEP, 0, 0]
SAMPLED = [13, STEP, 7]


def _expected() -> dict[str, list[int]]:
    """Candidate positions per request, straight from SPEC's rules 1 and 2."""
    expected = {}
    for row, req_id in enumerate(("a", "b", "c")):
        lo, hi = QUERY_START_LOC[row], QUERY_START_LOC[row + 1]
        tokens = INPUT_IDS[lo:hi] + [NEXT_PROMPT_IDS[row] if DISCARD[row] else SAMPLED[row]]
        positions = [
            FIRST_POSITIONS[row] + k
            for k in range(hi - lo)
            if tokens[k + 1] in RULE.step_token_ids and tokens[k] not in RULE.step_token_ids and tokens[k] != THINK
        ]
        if positions:
            expected[req_id] = positions
    return expected


def _step(device: str):
    torch.manual_seed(0)
    head = SPRMHead(HIDDEN).to(device).eval()
    runtime = SPRMRuntime(head, RULE, VOCAB, max_tokens=32, max_requests=4, dtype=torch.float32)
    runtime.hidden[: len(INPUT_IDS)] = torch.randn(len(INPUT_IDS), HIDDEN, device=device)
    runner = SimpleNamespace(
        input_ids=SimpleNamespace(gpu=torch.tensor(INPUT_IDS, dtype=torch.int32, device=device)),
        query_start_loc=SimpleNamespace(gpu=torch.tensor(QUERY_START_LOC, dtype=torch.int32, device=device)),
        discard_request_mask=SimpleNamespace(gpu=torch.tensor(DISCARD, device=device), np=np.array(DISCARD)),
    )
    layout = _StepLayout(
        req_ids=["a", "b", "c"],
        query_start_loc=np.array(QUERY_START_LOC),
        first_positions=np.array(FIRST_POSITIONS),
        num_tokens=len(INPUT_IDS),
        next_prompt_ids=np.array(NEXT_PROMPT_IDS),
    )
    sampled = torch.tensor(SAMPLED, dtype=torch.int32, device=device)[:, None]
    return runtime, runner, layout, sampled


def _check(runtime, records) -> None:
    expected = _expected()
    assert {req_id: positions for req_id, (positions, _) in records.items()} == expected
    rows = {"a": 0, "b": 6, "c": 7}
    first = dict(zip("abc", FIRST_POSITIONS))
    for req_id, (positions, logits) in records.items():
        hidden = runtime.hidden[[rows[req_id] + p - first[req_id] for p in positions]]
        want = runtime.head(hidden).float().cpu()
        torch.testing.assert_close(torch.tensor(logits), want, atol=1e-5, rtol=1e-5)


def test_step_records_on_cpu():
    runtime, runner, layout, sampled = _step("cpu")
    _run_update(runner, runtime, layout, sampled)
    _check(runtime, _host_records(layout))


def test_recorder_rejects_oversized_steps():
    recorder = StepLogitRecorder(SPRMHead(HIDDEN).eval(), RULE, VOCAB, max_tokens=4, max_requests=2)
    ids = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="exceeds the buffers"):
        recorder.update(torch.zeros(5, HIDDEN), ids, ids[:1], ids[:1], ids[:1].bool(), ids[:1])


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
    _check(runtime, _host_records(layout))

    # The device part in a CUDA graph, as under vLLM's full-graph capture: fixed buffers, replayed.
    recorder = runtime.recorder
    last_rows = runner.query_start_loc.gpu[1:] - 1
    discard = runner.discard_request_mask.gpu
    host = runtime.host[0]
    num_tokens = len(INPUT_IDS)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        recorder.update(runtime.hidden[:num_tokens], runner.input_ids.gpu, last_rows, sampled[:, 0], discard,
                        runtime.next_prompt_ids[:3])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        is_step, logits = recorder.update(
            runtime.hidden[:num_tokens], runner.input_ids.gpu, last_rows, sampled[:, 0], discard,
            runtime.next_prompt_ids[:3],
        )
        host.is_step[:num_tokens].copy_(is_step, non_blocking=True)
        host.logits[:num_tokens].copy_(logits, non_blocking=True)
    runtime.hidden[:num_tokens].normal_()
    host.is_step.zero_()
    graph.replay()
    torch.cuda.synchronize()
    layout.host_copy = (host.is_step[:num_tokens], host.logits[:num_tokens], None)
    _check(runtime, _host_records(layout))


# The same step under Model Runner V2: the token table holds each request's tokens by slot (the
# next prompt token of the partial chunk, and the sampled ones, included); rows past the step's
# 11 tokens are graph padding, and the layout is padded to 5 requests.
SLOTS = [2, 0, 1]
PADDED_ROWS = 16


def _engine_step(device: str):
    from xbai_kernels.vllm.recorder import EngineStepRecorder

    torch.manual_seed(0)
    head = SPRMHead(HIDDEN).to(device).eval()
    recorder = EngineStepRecorder(head, RULE, VOCAB, max_tokens=32, max_requests=5)
    token_ids = torch.full((4, 64), 9, dtype=torch.int32)
    for row, slot in enumerate(SLOTS):
        lo, hi = QUERY_START_LOC[row], QUERY_START_LOC[row + 1]
        first = FIRST_POSITIONS[row]
        token_ids[slot, first : first + hi - lo] = torch.tensor(INPUT_IDS[lo:hi])
        token_ids[slot, first + hi - lo] = NEXT_PROMPT_IDS[row] if DISCARD[row] else SAMPLED[row]
    positions = [FIRST_POSITIONS[row] + k for row in range(3) for k in range(QUERY_START_LOC[row + 1] - QUERY_START_LOC[row])]
    padding = PADDED_ROWS - len(INPUT_IDS)
    inputs = dict(
        hidden=torch.randn(PADDED_ROWS, HIDDEN, device=device),
        input_ids=torch.tensor(INPUT_IDS + [STEP] * padding, dtype=torch.int32, device=device),
        positions=torch.tensor(positions + [0] * padding, device=device),
        token_ids=token_ids.to(device),
    )
    return recorder, inputs


def _records_of(step) -> dict:
    from xbai_kernels.vllm.records import by_request, request_rows

    rows, positions, logits = step.scored()
    return by_request(request_rows(rows, np.array(QUERY_START_LOC), 3), positions, logits, ["a", "b", "c"])


def _check_engine(recorder, inputs, records) -> None:
    expected = _expected()
    assert {req_id: positions for req_id, (positions, _) in records.items()} == expected
    rows = {"a": 0, "b": 6, "c": 7}
    first = dict(zip("abc", FIRST_POSITIONS))
    for req_id, (positions, logits) in records.items():
        hidden = inputs["hidden"][[rows[req_id] + p - first[req_id] for p in positions]]
        want = reference.head_logits(hidden, *recorder.weights).cpu()
        torch.testing.assert_close(torch.tensor(logits), want, atol=1e-5, rtol=1e-5)


def test_engine_step_records_on_cpu():
    recorder, inputs = _engine_step("cpu")
    step = recorder.record(**inputs, query_start_loc=np.array(QUERY_START_LOC), slots=np.array(SLOTS),
                           num_rows=len(INPUT_IDS), num_padded_rows=PADDED_ROWS)
    _check_engine(recorder, inputs, _records_of(step))


def test_engine_recorder_rejects_oversized_steps():
    recorder, inputs = _engine_step("cpu")
    with pytest.raises(ValueError, match="a step of 40 rows / 3 requests exceeds the buffers \\(32 / 5\\)"):
        recorder.record(**inputs, query_start_loc=np.array(QUERY_START_LOC), slots=np.array(SLOTS),
                        num_rows=40, num_padded_rows=40)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_step_replays_a_captured_graph_without_host_sync():
    recorder, inputs = _engine_step("cuda")
    assert recorder.capture([8, PADDED_ROWS, 64], **inputs) == 2  # 64 exceeds the buffers
    layout = dict(query_start_loc=np.array(QUERY_START_LOC), slots=np.array(SLOTS), num_rows=len(INPUT_IDS))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replayed = recorder.record(**inputs, **layout, num_padded_rows=PADDED_ROWS)
        eager = recorder.record(**inputs, **layout, num_padded_rows=12)  # no graph for 12 rows: eager
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check_engine(recorder, inputs, _records_of(replayed))
    _check_engine(recorder, inputs, _records_of(eager))
    # A graph never runs on buffers other than those it captured.
    moved = {**inputs, "input_ids": inputs["input_ids"].clone()}
    _check_engine(recorder, inputs, _records_of(recorder.record(**moved, **layout, num_padded_rows=PADDED_ROWS)))
