"""Front-end side: collect each request's records and put the scores on its finished ``CompletionOutput``.

The output processor is the one place that knows a request's final token ids: it trims the
tokens after a stop string, which the engine already sampled and the worker already recorded.
So the SPEC rule runs here, on ``prompt_token_ids + output token_ids``, and reads the recorded
logits by position. The front end runs on the server's event loop, so it does no work per request
and step: each step's records are filed under their requests (work per scored row only), and the
rule's vectorised scan (``results.StepScan``) covers a request's tokens a chunk at a time on the
steps that bring it records; finishing scans what is left and scores the steps.

Each finished ``CompletionOutput`` of a scored request gets ``sprm_score`` (float, or None when it
could not be computed, with the reason in ``sprm_error``), ``sprm_step_scores`` (list of float)
and ``sprm_step_positions`` (list of int, indices into prompt + completion). A request whose
``SamplingParams.extra_args`` holds ``{"sprm_score_prompt": True}`` also gets
``sprm_prompt_score`` / ``sprm_prompt_step_scores`` / ``sprm_prompt_step_positions``: the prompt
alone scored as a trajectory (the released score server's job, done by the prefill).

The fields are plain attributes of the ``CompletionOutput`` that finishes a choice. When a consumer
reads more slowly than the engine produces, vLLM merges the queued deltas of a streamed request
into the first one (``RequestOutputCollector.put`` -> ``RequestOutput.add(aggregate=True)``),
copying its own fields only; ``request_output_add`` carries the SPRM fields over, so they reach the
consumer with the choice's ``finish_reason`` whatever the load.

The wrappers here are applied through ``patches`` (group ``frontend``), with every other vLLM internal the
plugin patches.
"""

from __future__ import annotations

import functools
import logging

from ..rule import StepRule
from . import options as sprm_options
from . import profile
from .engine import PAYLOAD_KEY
from .results import SCAN_CHUNK_TOKENS, SPRMResult, StepLogits, StepScan, score_positions, sprm_fields

logger = logging.getLogger("xbai_kernels.vllm")

SCORE_PROMPT_ARG = "sprm_score_prompt"

_RECORDS, _ENGINE, _SCAN, _PROMPT_LEN, _OPTIONS = (
    "xbai_sprm_records",
    "xbai_sprm_engine",
    "xbai_sprm_scan",
    "xbai_sprm_prompt_len",
    "xbai_sprm_options",
)


@functools.lru_cache(maxsize=8)
def _rule(step_ids: tuple[int, ...], think_start: int, think_end: int) -> StepRule:
    return StepRule(step_ids, think_start, think_end)


def _take_payload(engine_core_outputs) -> dict | None:
    """The step's payload of one engine batch: the scheduler puts it on the batch's first output
    (``engine._PendingRecords.attach``), so no other output is looked at."""
    if not engine_core_outputs:
        return None
    carrier = engine_core_outputs[0]
    params = carrier.kv_transfer_params
    if not params or PAYLOAD_KEY not in params:
        return None
    payload = params[PAYLOAD_KEY]
    rest = {key: value for key, value in params.items() if key != PAYLOAD_KEY}
    carrier.kv_transfer_params = rest or None
    return payload


class _EngineScoring:
    """Per output processor (one per engine): the engine's step rule, None until the engine
    announces it. Each request state holds a reference, so a request scores with its own engine's
    rule, and a request of an engine that scores nothing gets no fields."""

    __slots__ = ("rule",)

    def __init__(self) -> None:
        self.rule: StepRule | None = None


def _engine_scoring(processor) -> _EngineScoring:
    scoring = processor.__dict__.get(_ENGINE)
    if scoring is None:
        scoring = processor.__dict__[_ENGINE] = _EngineScoring()
    return scoring


def _prompt_ids(request_state) -> list[int]:
    return request_state.prompt_token_ids or []


def _start_scan(request_state, rule: StepRule) -> StepScan:
    """A scan of the request's prompt; its completion tokens follow as they arrive."""
    prompt = _prompt_ids(request_state)
    scan = StepScan(rule)
    scan.extend(prompt)
    setattr(request_state, _SCAN, scan)
    setattr(request_state, _PROMPT_LEN, len(prompt))
    return scan


def _collect(request_state, positions, logits) -> None:
    state = request_state.__dict__
    records = state.get(_RECORDS)
    if records is None:
        records = StepLogits()
        setattr(request_state, _RECORDS, records)
    records.add(positions, logits)
    # A request that records steps has its tokens scanned a chunk at a time, on its record steps
    # (still no work per request of the batch): finishing it then has at most a chunk, plus the
    # tokens after its last step, left to scan instead of the whole trajectory (0.5 ms and more
    # for 32k tokens, on the event loop).
    scoring = state.get(_ENGINE)
    if scoring is not None and scoring.rule is not None:
        scan = state.get(_SCAN) or _start_scan(request_state, scoring.rule)
        _scan_output_tokens(request_state, scan, minimum=SCAN_CHUNK_TOKENS)


def _scan_output_tokens(request_state, scan: StepScan, minimum: int) -> None:
    """Scan the output tokens that arrived since the last scan, if there are at least ``minimum``."""
    detokenizer = request_state.detokenizer
    if detokenizer is None:
        return
    done = scan.length - getattr(request_state, _PROMPT_LEN)
    if detokenizer.num_output_tokens() - done >= max(minimum, 1):
        scan.extend(detokenizer.output_token_ids[done:])


def _set_result(output, prefix: str, result: SPRMResult) -> None:
    setattr(output, f"{prefix}_score", result.score)
    setattr(output, f"{prefix}_step_scores", result.step_scores)
    setattr(output, f"{prefix}_step_positions", result.step_positions)
    if result.error is not None:
        setattr(output, f"{prefix}_error", result.error)
        logger.warning("xbai_kernels: no SPRM score for a completion: %s", result.error)


def _attach_scores(request_state, output) -> None:
    state = request_state.__dict__
    scoring = state.get(_ENGINE)
    rule = scoring.rule if scoring is not None else None
    if rule is None:
        return  # the engine scores nothing (no head, scoring off, or a pooling engine)
    records = state.get(_RECORDS) or StepLogits()
    scan = state.get(_SCAN) or _start_scan(request_state, rule)
    prompt_len = state[_PROMPT_LEN]
    if len(_prompt_ids(request_state)) != prompt_len:
        # vLLM's streaming input extended the prompt after the scan began: scan it all again.
        scan = _start_scan(request_state, rule)
        prompt_len = state[_PROMPT_LEN]
    _scan_output_tokens(request_state, scan, minimum=1)
    # A stop string may have trimmed tokens the scan already saw: score the tokens kept.
    final_length = prompt_len + request_state.detokenizer.num_output_tokens()
    _set_result(output, "sprm", score_positions(scan.positions(min(final_length, scan.length)), records))
    if (state.get(_OPTIONS) or {}).get(SCORE_PROMPT_ARG):
        _set_result(output, "sprm_prompt", score_positions(scan.positions(prompt_len), records))


# ----- the patches: each takes vLLM's original and returns the replacement -------------------------


def process_outputs(original):
    """``OutputProcessor.process_outputs``: take the step's records out of the batch and file them
    under their requests (work per scored row, none per request of the batch)."""

    @functools.wraps(original)
    def wrapper(self, engine_core_outputs, *args, **kwargs):
        payload = _take_payload(engine_core_outputs)
        if payload is not None:
            start = profile.now() if profile.ENABLED else 0
            if "rule" in payload:
                step_ids, think_start, think_end = payload["rule"]
                _engine_scoring(self).rule = _rule(tuple(step_ids), int(think_start), int(think_end))
            request_states = self.request_states
            for req_id, (positions, logits) in payload["records"].items():
                request_state = request_states.get(req_id)
                if request_state is not None:
                    _collect(request_state, positions, logits)
            if profile.ENABLED:
                profile.add("frontend.collect", profile.now() - start)
        return original(self, engine_core_outputs, *args, **kwargs)

    return wrapper


def add_request(original):
    """``OutputProcessor.add_request``: point the new request's state at its engine's scoring."""

    @functools.wraps(original)
    def wrapper(self, request, *args, **kwargs):
        result = original(self, request, *args, **kwargs)
        request_state = self.request_states.get(request.request_id)
        if request_state is not None:
            setattr(request_state, _ENGINE, _engine_scoring(self))
        return result

    return wrapper


def new_completion_output(original):
    """``RequestState._new_completion_output``: the output that finishes a choice gets its scores."""

    @functools.wraps(original)
    def wrapper(self, token_ids, finish_reason, stop_reason, *args, **kwargs):
        output = original(self, token_ids, finish_reason, stop_reason, *args, **kwargs)
        if finish_reason is not None:
            _attach_scores(self, output)
        return output

    return wrapper


def from_new_request(original):
    """``RequestState.from_new_request`` (a classmethod): note the request's SPRM options.

    They were checked when the request came in (``validate_params``); parsing them again keeps
    requests that bypass the input processor (a pre-built ``EngineCoreRequest``) from running with
    an option vLLM would have refused.
    """
    function = original.__func__

    @functools.wraps(function)
    def wrapper(cls, tokenizer, request, *args, **kwargs):
        sampling_params = request.sampling_params
        extra = sampling_params.extra_args if sampling_params is not None else None
        values = sprm_options.parse_options(extra, "SamplingParams.extra_args")
        state = function(cls, tokenizer, request, *args, **kwargs)
        setattr(state, _OPTIONS, values)
        return state

    return classmethod(wrapper)


def request_output_add(original):
    """``RequestOutput.add``: keep the SPRM fields of a merged delta on the output that absorbs it.

    vLLM merges a completion into the earlier one with the same ``index`` (aggregate) or replaces
    it (the fields then come along); either way the fields end up on the output of that index.
    """

    @functools.wraps(original)
    def wrapper(self, next_output, *args, **kwargs):
        carried = [(completion.index, fields) for completion in next_output.outputs if (fields := sprm_fields(completion))]
        original(self, next_output, *args, **kwargs)
        if carried:
            by_index = {completion.index: completion for completion in self.outputs}
            for index, fields in carried:
                target = by_index.get(index)
                if target is not None:
                    for name, value in fields.items():
                        setattr(target, name, value)

    return wrapper


def validate_params(original):
    """``InputProcessor._validate_params``: refuse unknown or invalid SPRM options of a request
    (``SPRMOptionError``, a ``ValueError``) before it reaches the engine, with vLLM's own checks."""

    @functools.wraps(original)
    def wrapper(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None)
        if extra:
            sprm_options.parse_options(extra, "SamplingParams.extra_args")
        return result

    return wrapper
