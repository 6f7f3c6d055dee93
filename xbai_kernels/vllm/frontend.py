"""Front-end side: collect each request's records and put the scores on its finished ``CompletionOutput``.

The output processor is the one place that knows a request's final token ids: it trims the
tokens after a stop string, which the engine already sampled and the worker already recorded.
So the SPEC rule runs here, on ``prompt_token_ids + output token_ids``, and reads the recorded
logits by position.

Each finished ``CompletionOutput`` of a scored request gets ``sprm_score`` (float, or None when it
could not be computed, with the reason in ``sprm_error``), ``sprm_step_scores`` (list of float)
and ``sprm_step_positions`` (list of int, indices into prompt + completion). A request whose
``SamplingParams.extra_args`` holds ``{"sprm_score_prompt": True}`` also gets
``sprm_prompt_score`` / ``sprm_prompt_step_scores`` / ``sprm_prompt_step_positions``: the prompt
alone scored as a trajectory (the released score server's job, done by the prefill).
"""

from __future__ import annotations

import functools
import logging

from ..rule import StepRule
from .engine import PAYLOAD_KEY
from .results import SPRMResult, StepLogits, score_from_records

logger = logging.getLogger("xbai_kernels.vllm")

SCORE_PROMPT_ARG = "sprm_score_prompt"
_PATCHED: dict[str, object] = {}


@functools.lru_cache(maxsize=8)
def _rule(step_ids: tuple[int, ...], think_start: int, think_end: int) -> StepRule:
    return StepRule(step_ids, think_start, think_end)


def _take_payload(engine_core_output) -> dict | None:
    params = engine_core_output.kv_transfer_params
    if not params or PAYLOAD_KEY not in params:
        return None
    payload = params[PAYLOAD_KEY]
    rest = {key: value for key, value in params.items() if key != PAYLOAD_KEY}
    engine_core_output.kv_transfer_params = rest or None
    return payload


def _collect(request_state, payload: dict) -> None:
    records = getattr(request_state, "xbai_sprm_records", None)
    if records is None:
        records = request_state.xbai_sprm_records = StepLogits()
    if "rule" in payload:
        step_ids, think_start, think_end = payload["rule"]
        request_state.xbai_sprm_rule = _rule(tuple(step_ids), int(think_start), int(think_end))
    records.add(payload["positions"], payload["logits"])


def _set_result(output, prefix: str, result: SPRMResult) -> None:
    setattr(output, f"{prefix}_score", result.score)
    setattr(output, f"{prefix}_step_scores", result.step_scores)
    setattr(output, f"{prefix}_step_positions", result.step_positions)
    if result.error is not None:
        setattr(output, f"{prefix}_error", result.error)
        logger.warning("xbai_kernels: no SPRM score for a completion: %s", result.error)


def _attach_scores(request_state, output) -> None:
    records = getattr(request_state, "xbai_sprm_records", None)
    rule = getattr(request_state, "xbai_sprm_rule", None)
    if records is None or rule is None:
        return
    prompt = list(request_state.prompt_token_ids or [])
    completion = list(request_state.detokenizer.output_token_ids)
    _set_result(output, "sprm", score_from_records(prompt + completion, records, rule))
    if getattr(request_state, "xbai_sprm_score_prompt", False):
        _set_result(output, "sprm_prompt", score_from_records(prompt, records, rule))


def _patched_process_outputs(original):
    @functools.wraps(original)
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        for engine_core_output in engine_core_outputs:
            payload = _take_payload(engine_core_output)
            if payload is None:
                continue
            request_state = self.request_states.get(engine_core_output.request_id)
            if request_state is not None:
                _collect(request_state, payload)
        return original(self, engine_core_outputs, *args, **kwargs)

    return process_outputs


def _patched_new_completion_output(original):
    @functools.wraps(original)
    def _new_completion_output(self, token_ids, finish_reason, stop_reason, *args, **kwargs):
        output = original(self, token_ids, finish_reason, stop_reason, *args, **kwargs)
        if finish_reason is not None:
            _attach_scores(self, output)
        return output

    return _new_completion_output


def _patched_from_new_request(original):
    def from_new_request(cls, tokenizer, request, *args, **kwargs):
        state = original.__func__(cls, tokenizer, request, *args, **kwargs)
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        state.xbai_sprm_score_prompt = bool(extra and extra.get(SCORE_PROMPT_ARG))
        return state

    return classmethod(functools.wraps(original.__func__)(from_new_request))


def patch_output_processor() -> bool:
    """Patch vLLM's V1 ``OutputProcessor`` / ``RequestState`` once per process."""
    if _PATCHED:
        return False
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState

    targets = (
        (OutputProcessor, "process_outputs", _patched_process_outputs),
        (RequestState, "_new_completion_output", _patched_new_completion_output),
        (RequestState, "from_new_request", _patched_from_new_request),
    )
    for owner, name, factory in targets:
        original = owner.__dict__[name]
        _PATCHED[name] = (owner, original)
        setattr(owner, name, factory(original))
    return True


def revert_output_processor() -> None:
    for name, (owner, original) in _PATCHED.items():
        setattr(owner, name, original)
    _PATCHED.clear()
