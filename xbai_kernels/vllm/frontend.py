"""Front-end side: put the scores on each scored request's finishing ``CompletionOutput``.

The scheduler sends, with the output that stops a request, its step candidates, their logits and
its thinking markers (``logit_store.FinishedLogits``). The output processor is the one place that
knows a request's final token ids: it trims the tokens after a stop string, which the engine
already sampled. So the thinking-region rule runs here, over the tokens kept, and the steps are
scored (``results``): O(steps) on the server's event loop, nothing per step or per token.

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

from . import options as sprm_options
from . import profile, pruning
from .engine import PAYLOAD_KEY
from .logit_store import FinishedLogits
from .results import SPRMResult, region_positions, score_steps, sprm_fields

logger = logging.getLogger("xbai_kernels.vllm")

SCORE_PROMPT_ARG = "sprm_score_prompt"

_FINISHED, _CHUNKS, _ENGINE, _OPTIONS = "xbai_sprm_finished", "xbai_sprm_chunks", "xbai_sprm_engine", "xbai_sprm_options"
_PRUNED = "xbai_sprm_pruned"


def _take_payload(engine_core_outputs) -> dict | None:
    """The step's payload of one engine batch: the scheduler puts it on the batch's first output
    (``engine._SchedulerScoring.attach``), so no other output is looked at."""
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
    """Per output processor (one per engine): whether the engine scores, known from its first
    payload. Each request state holds a reference, so a request of an engine that scores nothing
    gets no fields, and one of a scoring engine that sent nothing for it gets an error."""

    __slots__ = ("scores",)

    def __init__(self) -> None:
        self.scores = False


def _engine_scoring(processor) -> _EngineScoring:
    scoring = processor.__dict__.get(_ENGINE)
    if scoring is None:
        scoring = processor.__dict__[_ENGINE] = _EngineScoring()
    return scoring


def _set_result(output, prefix: str, result: SPRMResult) -> None:
    setattr(output, f"{prefix}_score", result.score)
    setattr(output, f"{prefix}_step_scores", result.step_scores)
    setattr(output, f"{prefix}_step_positions", result.step_positions)
    if result.error is not None:
        setattr(output, f"{prefix}_error", result.error)
        logger.warning("xbai_kernels: no SPRM score for a completion: %s", result.error)


def _attach_scores(request_state, output, finish_reason) -> None:
    state = request_state.__dict__
    scoring = state.get(_ENGINE)
    if scoring is None or not scoring.scores:
        return  # the engine scores nothing (no head, scoring off, or a pooling engine)
    finished, chunks = state.pop(_FINISHED, None), state.pop(_CHUNKS, None)
    if finished is None and chunks:
        finished = FinishedLogits.join(chunks)
    if finished is None and str(finish_reason) == "abort":
        return  # an aborted request has no scores to give
    prompt_len = len(request_state.prompt_token_ids or ())
    # A stop string may have trimmed tokens the engine sampled: score the tokens kept.
    final_length = prompt_len + request_state.detokenizer.num_output_tokens()
    covered = 0 if finished is None else finished.length
    if covered < final_length:  # nothing sent, or stop-string chunks that fell behind (preemption)
        error = f"the engine sent step logits for {covered} of the {final_length} tokens"
        _set_result(output, "sprm", SPRMResult(None, [], [], error=error))
        return
    _set_result(output, "sprm", score_steps(*region_positions(finished, final_length)))
    if (state.get(_OPTIONS) or {}).get(SCORE_PROMPT_ARG):
        _set_result(output, "sprm_prompt", score_steps(*region_positions(finished, prompt_len)))
    pruned = state.pop(_PRUNED, None)
    if pruned is not None:  # a candidate a pruning policy watched: whether it stopped it, and why
        output.sprm_pruned = pruned["pruned_at_step"] is not None
        output.sprm_pruned_at_step = pruned["pruned_at_step"]
        output.sprm_prune_decisions = pruned["decisions"]


# ----- the patches: each takes vLLM's original and returns the replacement -------------------------


def process_outputs(original):
    """``OutputProcessor.process_outputs``: hand each stopping request of the batch its logits (work
    per stopping request only, none per request of the batch)."""

    @functools.wraps(original)
    def wrapper(self, engine_core_outputs, *args, **kwargs):
        payload = _take_payload(engine_core_outputs)
        if payload is not None:
            start = profile.now() if profile.ENABLED else 0
            _engine_scoring(self).scores = True
            request_states = self.request_states
            for req_id, finished in payload["stopped"].items():
                request_state = request_states.get(req_id)
                if request_state is not None:
                    setattr(request_state, _FINISHED, FinishedLogits.from_payload(finished))
            for req_id, record in payload.get("pruned", {}).items():
                request_state = request_states.get(req_id)
                if request_state is not None:
                    setattr(request_state, _PRUNED, record)
            # A stop-string request's logits so far: a stop string ends it here, unseen by the engine.
            for req_id, chunk in payload["chunks"].items():
                request_state = request_states.get(req_id)
                if request_state is not None:
                    request_state.__dict__.setdefault(_CHUNKS, []).append(FinishedLogits.from_payload(chunk))
            if profile.ENABLED:
                profile.add("frontend.finish", profile.now() - start)
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
            _attach_scores(self, output, finish_reason)
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


def parent_request_init(original):
    """``ParentRequest.__init__`` (an n > 1 request, before it fans out): when it asks for pruning,
    tell the engine which requests are siblings and how many there are. The children share the
    parent's ``extra_args`` (a shallow copy of its sampling parameters), and the engine core sees
    neither the parent nor n, so both go in under ``pruning.GROUP_KEY``."""

    @functools.wraps(original)
    def wrapper(self, request, *args, **kwargs):
        original(self, request, *args, **kwargs)
        params = self.sampling_params
        extra = getattr(params, "extra_args", None)
        if extra and pruning.OPTION in extra:
            # A new dict: the request's parameters are vLLM's own copy, but the dict may be the caller's.
            params.extra_args = {**extra, pruning.GROUP_KEY: [self.request_id, params.n]}

    return wrapper


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
