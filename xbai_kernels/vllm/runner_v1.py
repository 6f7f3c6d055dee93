"""Worker side: a patch of vLLM's (V1) GPU model runner, which the CPU runner subclasses.

Per engine step:

* ``execute_model`` (after the forward): note the step's host-side layout, i.e. the request ids by
  row, ``query_start_loc``, each request's first scheduled position, which rows are partial
  prefill chunks and, for those, the next prompt token;
* ``_update_states_after_model_execute`` (sampled ids still on the device): run
  ``StepLogitRecorder.update`` and start the copy of its two small outputs to the host;
* ``sample_tokens`` (its ``ModelRunnerOutput`` built): attach ``{request id: (positions,
  logits)}`` as the attribute ``xbai_sprm`` for the scheduler (an extra attribute survives the
  executor's pickle hop). With async scheduling the attribute is filled when vLLM resolves the
  output, after its own copy, so no host wait is added to the step.

Rows move between steps (``condense``, ``swap_states``); nothing here keeps state per row: the
layout is captured per step and results are keyed by request id and absolute position.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("xbai_kernels.vllm")

RECORDS_ATTRIBUTE = "xbai_sprm"
_PATCHED: dict[str, object] = {}


@dataclass
class _StepLayout:
    """Host-side facts of one engine step, captured before the batch rows can move."""

    req_ids: list[str]
    query_start_loc: np.ndarray  # int [R + 1]
    first_positions: np.ndarray  # int [R]: position of each request's first scheduled token
    num_tokens: int
    next_prompt_ids: np.ndarray  # int64 [R]: next prompt token of partial-prefill rows, else 0
    host_copy: tuple | None = None  # (is_step, logits, ready event or None) once the update ran


def _runtime(runner):
    model = runner.get_model() if hasattr(runner, "model") else None
    return getattr(model, "sprm", None) if model is not None else None


def _capture_layout(runner) -> _StepLayout:
    num_reqs = runner.input_batch.num_reqs
    query_start_loc = runner.query_start_loc.np[: num_reqs + 1].astype(np.int64)
    first_positions = runner.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
    discard = runner.discard_request_mask.np[:num_reqs]
    next_prompt_ids = np.zeros(num_reqs, dtype=np.int64)
    for row in np.nonzero(discard)[0]:
        following = first_positions[row] + query_start_loc[row + 1] - query_start_loc[row]
        next_prompt_ids[row] = runner.input_batch.token_ids_cpu[row, following]
    return _StepLayout(
        req_ids=list(runner.input_batch.req_ids[:num_reqs]),
        query_start_loc=query_start_loc,
        first_positions=first_positions,
        num_tokens=int(query_start_loc[-1]),
        next_prompt_ids=next_prompt_ids,
    )


def _run_update(runner, runtime, layout: _StepLayout, sampled_token_ids: torch.Tensor) -> None:
    num_reqs, num_tokens = len(layout.req_ids), layout.num_tokens
    on_cuda = runtime.recorder.device.type == "cuda"
    host = runtime.next_host_buffers()
    # Staged through pinned memory: asynchronous copies both ways, no wait on the host.
    staged = host.next_prompt_ids[:num_reqs]
    staged.numpy()[:] = layout.next_prompt_ids
    next_prompt = runtime.next_prompt_ids[:num_reqs]
    next_prompt.copy_(staged, non_blocking=on_cuda)
    is_step, logits = runtime.recorder.update(
        runtime.hidden[:num_tokens],
        runner.input_ids.gpu[:num_tokens],
        runner.query_start_loc.gpu[1 : num_reqs + 1] - 1,
        sampled_token_ids[:num_reqs, 0],
        runner.discard_request_mask.gpu[:num_reqs],
        next_prompt,
    )
    host_is_step, host_logits = host.is_step[:num_tokens], host.logits[:num_tokens]
    host_is_step.copy_(is_step, non_blocking=on_cuda)
    host_logits.copy_(logits, non_blocking=on_cuda)
    ready = None
    if on_cuda:
        ready = torch.cuda.Event()
        ready.record()
    layout.host_copy = (host_is_step, host_logits, ready)


def _host_records(layout: _StepLayout) -> dict[str, tuple[list[int], list[float]]]:
    """{request id: (positions, logits)} of this step's candidate positions (waits for the copy)."""
    is_step, logits, ready = layout.host_copy
    if ready is not None:
        ready.synchronize()
    rows = np.nonzero(is_step.numpy())[0]
    if rows.size == 0:
        return {}
    request_rows = np.searchsorted(layout.query_start_loc, rows, side="right") - 1
    positions = layout.first_positions[request_rows] + rows - layout.query_start_loc[request_rows]
    values = logits.numpy()[rows]
    records: dict[str, tuple[list[int], list[float]]] = {}
    for row, position, value in zip(request_rows.tolist(), positions.tolist(), values.tolist()):
        entry = records.setdefault(layout.req_ids[row], ([], []))
        entry[0].append(position)
        entry[1].append(value)
    return records


def _patched_execute_model(original):
    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        output = original(self, scheduler_output, *args, **kwargs)
        runtime = _runtime(self)
        if runtime is not None:
            runtime.layout = _capture_layout(self) if self.execute_model_state is not None else None
        return output

    return execute_model


def _patched_update_states(original):
    @functools.wraps(original)
    def _update_states_after_model_execute(self, output_token_ids, scheduler_output, *args, **kwargs):
        original(self, output_token_ids, scheduler_output, *args, **kwargs)
        runtime = _runtime(self)
        if runtime is not None and runtime.layout is not None:
            _run_update(self, runtime, runtime.layout, output_token_ids)

    return _update_states_after_model_execute


def _patched_sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        runtime = _runtime(self)
        if runtime is None:
            return output
        layout, runtime.layout = runtime.layout, None
        if layout is None or layout.host_copy is None:
            return output
        inner = getattr(output, "_model_runner_output", None)
        if inner is not None:
            resolve = output.get_output

            def get_output():
                resolved = resolve()
                setattr(resolved, RECORDS_ATTRIBUTE, _host_records(layout))
                return resolved

            output.get_output = get_output
        elif hasattr(output, "req_id_to_index") and output.req_ids:
            setattr(output, RECORDS_ATTRIBUTE, _host_records(layout))
        return output

    return sample_tokens


def patch_model_runner() -> bool:
    """Patch ``GPUModelRunner`` once per process; returns True when this call installed the patch."""
    if _PATCHED:
        return False
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name, factory in (
        ("execute_model", _patched_execute_model),
        ("_update_states_after_model_execute", _patched_update_states),
        ("sample_tokens", _patched_sample_tokens),
    ):
        original = getattr(GPUModelRunner, name)
        _PATCHED[name] = original
        setattr(GPUModelRunner, name, factory(original))
    logger.info("xbai_kernels: SPRM step recording installed in vLLM's GPUModelRunner")
    return True


def revert_model_runner() -> None:
    """Undo ``patch_model_runner`` (tests; a live engine would stop recording)."""
    if not _PATCHED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name, original in _PATCHED.items():
        setattr(GPUModelRunner, name, original)
    _PATCHED.clear()
