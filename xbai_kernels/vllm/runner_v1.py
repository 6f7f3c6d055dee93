"""Worker side: a patch of vLLM's (V1) GPU model runner, which the CPU runner subclasses.

Per engine step:

* ``execute_model`` (after the forward): note the step's host-side layout, i.e. the request ids by
  row, ``query_start_loc``, each request's first scheduled position, which rows are partial
  prefill chunks and, for those, the next prompt token;
* ``_update_states_after_model_execute`` (sampled ids still on the device): run
  ``StepLogitRecorder.update`` and start the copy of the step's rows to the host;
* ``sample_tokens`` (its ``ModelRunnerOutput`` built): attach the step's rows (each row's KV-cache
  slot and logit, ``records``) as the attribute ``xbai_sprm`` for the scheduler (an extra
  attribute survives the executor's pickle hop). With async scheduling the attribute is filled
  when vLLM resolves the output, after its own copy, so no host wait is added to the step.

Rows move between steps (``condense``, ``swap_states``); nothing here keeps state per row: the
layout is captured per step and results are keyed by KV-cache slot.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from . import profile, records

logger = logging.getLogger("xbai_kernels.vllm")


@dataclass
class _StepLayout:
    """Host-side facts of one engine step, captured before the batch rows can move."""

    num_requests: int
    query_start_loc: np.ndarray  # int [R + 1]
    num_tokens: int
    next_prompt_ids: np.ndarray  # int64 [R]: next prompt token of partial-prefill rows, else 0
    host_copy: tuple | None = None  # device path: (rows int32 [2, T] pinned, ready event) once the update ran
    host_rows: np.ndarray | None = None  # CPU path: the step's rows (``records``' layout) once the update ran


def _runtime(runner):
    model = getattr(runner, "model", None)
    runtime = getattr(model, "sprm", None) if model is not None else None
    return runtime if runtime is not None and runtime.recorder is not None and runtime.active else None


def _slot_mapping(runner):
    """vLLM's ``CpuGpuBuffer`` of each scheduled row's KV-cache slot (int64 [max_tokens], the one
    KV group's slot mapping): ``.gpu`` on the device, ``.np`` its host copy's numpy view."""
    return runner.input_batch.block_table[0].slot_mapping


def _capture_layout(runner) -> _StepLayout:
    num_reqs = runner.input_batch.num_reqs
    query_start_loc = runner.query_start_loc.np[: num_reqs + 1].astype(np.int64)
    discard = runner.discard_request_mask.np[:num_reqs]
    next_prompt_ids = np.zeros(num_reqs, dtype=np.int64)
    if discard.any():
        first_positions = runner.input_batch.num_computed_tokens_cpu[:num_reqs]
        for row in np.flatnonzero(discard):
            following = first_positions[row] + query_start_loc[row + 1] - query_start_loc[row]
            next_prompt_ids[row] = runner.input_batch.token_ids_cpu[row, following]
    return _StepLayout(
        num_requests=num_reqs,
        query_start_loc=query_start_loc,
        num_tokens=int(query_start_loc[-1]),
        next_prompt_ids=next_prompt_ids,
    )


def _run_update(runner, runtime, layout: _StepLayout, sampled_token_ids: torch.Tensor) -> None:
    if runtime.recorder.device.type == "cpu":
        _record_on_host(runner, runtime, layout, sampled_token_ids)
        return
    num_reqs, num_tokens = layout.num_requests, layout.num_tokens
    host = runtime.next_host_buffers()
    # Staged through pinned memory: asynchronous copies both ways, no wait on the host.
    staged = host.next_prompt_ids[:num_reqs]
    staged.numpy()[:] = layout.next_prompt_ids
    next_prompt = runtime.next_prompt_ids[:num_reqs]
    next_prompt.copy_(staged, non_blocking=True)
    keep, logits = runtime.recorder.update(
        runtime.hidden[:num_tokens],
        runner.input_ids.gpu[:num_tokens],
        runner.positions[:num_tokens],
        runner.query_start_loc.gpu[1 : num_reqs + 1] - 1,
        sampled_token_ids[:num_reqs, 0],
        runner.discard_request_mask.gpu[:num_reqs],
        next_prompt,
    )
    slots = _slot_mapping(runner).gpu[:num_tokens]
    coded = torch.stack((slots.int(), torch.where(keep, logits, torch.nan).view(torch.int32)))
    host_rows = host.rows[: 2 * num_tokens].view(2, num_tokens)
    host_rows.copy_(coded, non_blocking=True)
    ready = torch.cuda.Event(blocking=True)
    ready.record()
    layout.host_copy = (host_rows, ready)


def _record_on_host(runner, runtime, layout: _StepLayout, sampled_token_ids: torch.Tensor) -> None:
    """The CPU engine's step: every tensor is host memory, so the rule and the head run in numpy
    (``recorder.HostStep``), the head on the kept rows only. The persistent buffers are read through
    numpy views made once: a torch slice costs microseconds here, a numpy one a fraction of that."""
    num_reqs, num_tokens = layout.num_requests, layout.num_tokens
    recorder, host = runtime.recorder, runtime.host_step
    current = runner.input_ids.np[:num_tokens]
    discard = runner.discard_request_mask.np[:num_reqs]
    # The token after each request's last row: the one sampled, or the next prompt token after a
    # partial prefill chunk (whose sample vLLM throws away).
    after_last = np.where(discard, layout.next_prompt_ids, sampled_token_ids.numpy()[:num_reqs, 0])
    if num_tokens == num_reqs:  # one row per request (a decode step): every row is a request's last
        following = after_last
    else:
        following = np.empty(num_tokens, dtype=np.int64)
        following[:-1] = current[1:]
        following[layout.query_start_loc[1:] - 1] = after_last
    keep = recorder.keeps(host.opens(current, following), _numpy_view(runner, "positions", runner.positions)[:num_tokens])
    rows = np.flatnonzero(keep)
    logits = host.logits(rows) if rows.size else np.zeros(0, dtype=np.float32)
    layout.host_rows = records.encode(_slot_mapping(runner).np[:num_tokens], rows, logits)


_VIEWS = "_xbai_sprm_numpy_views"


def _numpy_view(runner, name: str, tensor: torch.Tensor) -> np.ndarray:
    """The numpy view of one of the runner's persistent CPU tensors, made once per tensor object."""
    views = runner.__dict__.setdefault(_VIEWS, {})
    entry = views.get(name)
    if entry is None or entry[0] is not tensor:
        entry = views[name] = (tensor, tensor.numpy())
    return entry[1]


def _host_records(layout: _StepLayout) -> np.ndarray:
    """The step's rows (``records``' layout); waits for the device path's copy."""
    start = profile.now() if profile.ENABLED else 0
    if layout.host_rows is not None:
        rows = layout.host_rows
    else:
        host_rows, ready = layout.host_copy
        ready.synchronize()
        rows = host_rows.numpy().copy()
    if profile.ENABLED:
        profile.add("worker.read", profile.now() - start)
    return rows


def execute_model(original):
    @functools.wraps(original)
    def wrapper(self, scheduler_output, *args, **kwargs):
        output = original(self, scheduler_output, *args, **kwargs)
        runtime = _runtime(self)
        if runtime is not None:
            start = profile.now() if profile.ENABLED else 0
            runtime.layout = _capture_layout(self) if self.execute_model_state is not None else None
            if profile.ENABLED:
                profile.add("worker.layout", profile.now() - start, calls=0)
        return output

    return wrapper


def update_states_after_model_execute(original):
    @functools.wraps(original)
    def wrapper(self, output_token_ids, scheduler_output, *args, **kwargs):
        original(self, output_token_ids, scheduler_output, *args, **kwargs)
        runtime = _runtime(self)
        if runtime is not None and runtime.layout is not None:
            start = profile.now() if profile.ENABLED else 0
            _run_update(self, runtime, runtime.layout, output_token_ids)
            if profile.ENABLED:
                profile.add("worker.record", profile.now() - start)

    return wrapper


def sample_tokens(original):
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        runtime = _runtime(self)
        if runtime is None:
            return output
        layout, runtime.layout = runtime.layout, None
        if layout is not None and (layout.host_copy is not None or layout.host_rows is not None) and output is not None:
            records.attach(output, functools.partial(_host_records, layout))
        return output

    return wrapper
