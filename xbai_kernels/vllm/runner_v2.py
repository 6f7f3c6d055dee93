"""Worker side under Model Runner V2 (vLLM's GPU default): record each step's scored rows.

V2 keeps, per request (a row of its token table), every token id the request has
(``req_states.all_token_ids``, the sampled one written there by ``postprocess_sampled``), and its
input buffers (``input_ids``, ``positions``, ``query_start_loc``, the slot mapping) sit at fixed
addresses. So one step's scoring needs from the host only the requests' table rows, and runs as
one replay of a CUDA graph that ``capture_model`` captured beside vLLM's own (``EngineStepRecorder``).
Patched:

* ``capture_model``: after vLLM's graphs, capture ours for the same padded sizes;
* ``sample_tokens``: after vLLM's sampling and state update, record the step and attach its rows
  (``records``) to the output when vLLM resolves it (async scheduling resolves it a step later,
  after its own copy, so the host never waits inside the step).
"""

from __future__ import annotations

import functools
import logging

import torch

from . import profile, records

logger = logging.getLogger("xbai_kernels.vllm")


def _runtime(runner):
    model = getattr(runner, "model", None)
    runtime = getattr(model, "sprm", None) if model is not None else None
    return runtime if runtime is not None and runtime.engine is not None and runtime.active else None


# The slot mapping is row 0 of a [groups, tokens] tensor: indexing it makes a new view object every
# time, so the view is made once per tensor and reused (``record`` checks its inputs by identity).
_SLOTS_VIEW = "_xbai_sprm_slots_view"


def _engine_inputs(runner) -> tuple[torch.Tensor, ...]:
    """input_ids, positions, cache slots (the one KV group's slot mapping), the row boundaries and
    the token table: the persistent buffers a step reads."""
    buffers = runner.input_buffers
    slot_mappings = runner.block_tables.slot_mappings
    view = runner.__dict__.get(_SLOTS_VIEW)
    if view is None or view[0] is not slot_mappings:
        view = runner.__dict__[_SLOTS_VIEW] = (slot_mappings, slot_mappings[0])
    return buffers.input_ids, buffers.positions, view[1], buffers.query_start_loc, runner.req_states.all_token_ids.gpu


def capture_model(original):
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        runtime = _runtime(self)
        if runtime is not None:
            sizes = self.vllm_config.compilation_config.cudagraph_capture_sizes or ()
            count = runtime.engine.capture(sizes, runtime.hidden, *_engine_inputs(self))
            logger.info("xbai_kernels: SPRM step recording captured for %d padded batch sizes", count)
        return result

    return wrapper


def sample_tokens(original):
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        state = self.execute_model_state
        output = original(self, *args, **kwargs)
        runtime = _runtime(self)
        if runtime is None or state is None or output is None:
            return output
        batch = state.input_batch
        if not batch.req_ids:
            return output
        start = profile.now() if profile.ENABLED else 0
        num_requests = batch.num_reqs
        step = runtime.engine.record(
            runtime.hidden,
            *_engine_inputs(self),
            batch.idx_mapping_np[:num_requests],
            batch.num_tokens,
            batch.num_tokens_after_padding,
        )

        def build():
            start = profile.now() if profile.ENABLED else 0
            rows = step.rows()
            if profile.ENABLED:
                profile.add("worker.read", profile.now() - start)
            return rows

        records.attach(output, build)
        if profile.ENABLED:
            profile.add("worker.record", profile.now() - start)
        return output

    return wrapper
