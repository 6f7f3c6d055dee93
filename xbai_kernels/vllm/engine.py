"""Engine-core side: carry the worker's step records from ``ModelRunnerOutput`` to the front end.

``EngineCoreOutput`` cannot grow fields, but its ``kv_transfer_params`` dict reaches the front
end's output processor. Records travel there under the namespaced key ``PAYLOAD_KEY``; a KV
connector's own entries are kept as they are (the dict is copied, never replaced), and the front
end removes the key again before anything else reads the dict.

Partial prefill chunks emit no output, so records wait in the scheduler until the request's next
output. Scored requests never read the prefix cache: a cached prompt position is never
computed, so its hidden state (needed when a step of the prompt falls in the thinking region)
would be missing.
"""

from __future__ import annotations

import functools
import logging

from ..rule import StepRule
from . import config as sprm_config

logger = logging.getLogger("xbai_kernels.vllm")

PAYLOAD_KEY = "xbai_sprm"
_PATCHED: dict[str, object] = {}


class _PendingRecords:
    """Per-scheduler buffers: records not yet sent, and the requests announced as scored."""

    def __init__(self, rule: StepRule) -> None:
        self.by_request: dict[str, tuple[list[int], list[float]]] = {}
        self.announced: set[str] = set()
        # The front end has no model config: the first payload of a request tells it the rule.
        self.rule_payload = [list(rule.step_token_ids), rule.think_start_id, rule.think_end_id]

    def add(self, records: dict) -> None:
        for req_id, (positions, logits) in records.items():
            entry = self.by_request.setdefault(req_id, ([], []))
            entry[0].extend(positions)
            entry[1].extend(logits)

    def attach(self, engine_core_output) -> None:
        req_id = engine_core_output.request_id
        positions, logits = self.by_request.pop(req_id, ((), ()))
        first = req_id not in self.announced
        finished = engine_core_output.finish_reason is not None
        if not (positions or first or finished):
            return
        payload = {"positions": list(positions), "logits": list(logits)}
        if first:
            payload["rule"] = self.rule_payload
        params = engine_core_output.kv_transfer_params
        engine_core_output.kv_transfer_params = {**params, PAYLOAD_KEY: payload} if params else {PAYLOAD_KEY: payload}
        if finished:
            self.announced.discard(req_id)
        else:
            self.announced.add(req_id)

    def forget_missing(self, live_requests) -> None:
        """Drop state of requests the scheduler no longer holds (aborted, e.g. by a stop string)."""
        for req_id in [r for r in self.announced if r not in live_requests]:
            self.announced.discard(req_id)
        for req_id in [r for r in self.by_request if r not in live_requests]:
            del self.by_request[req_id]


def _pending(scheduler) -> _PendingRecords:
    pending = scheduler.__dict__.get("_xbai_sprm_pending")
    if pending is None:
        from vllm.tokenizers import cached_tokenizer_from_config

        model_config = scheduler.vllm_config.model_config
        tokenizer = cached_tokenizer_from_config(model_config)
        rule = StepRule.from_tokenizer(tokenizer, lang=sprm_config.step_language(model_config))
        pending = scheduler.__dict__["_xbai_sprm_pending"] = _PendingRecords(rule)
    return pending


def _scoring_on(scheduler) -> bool:
    cached = scheduler.__dict__.get("_xbai_sprm_on")
    if cached is None:
        model_config = scheduler.vllm_config.model_config
        cached = model_config.runner_type == "generate" and sprm_config.head_location(model_config) is not None
        scheduler.__dict__["_xbai_sprm_on"] = cached
    return cached


def _patched_add_request(original):
    @functools.wraps(original)
    def add_request(self, request, *args, **kwargs):
        if _scoring_on(self) and request.sampling_params is not None:
            request.skip_reading_prefix_cache = True
        return original(self, request, *args, **kwargs)

    return add_request


def _patched_update_from_output(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        records = getattr(model_runner_output, PAYLOAD_KEY, None)
        if records is None:
            return original(self, scheduler_output, model_runner_output, *args, **kwargs)
        pending = _pending(self)
        pending.add(records)
        outputs = original(self, scheduler_output, model_runner_output, *args, **kwargs)
        for engine_core_outputs in outputs.values():
            for engine_core_output in engine_core_outputs.outputs:
                pending.attach(engine_core_output)
        pending.forget_missing(self.requests)
        return outputs

    return update_from_output


def patch_scheduler() -> bool:
    """Patch vLLM's V1 ``Scheduler`` once per process; True when this call installed it."""
    if _PATCHED:
        return False
    from vllm.v1.core.sched.scheduler import Scheduler

    for name, factory in (("add_request", _patched_add_request), ("update_from_output", _patched_update_from_output)):
        original = getattr(Scheduler, name)
        _PATCHED[name] = original
        setattr(Scheduler, name, factory(original))
    return True


def revert_scheduler() -> None:
    if not _PATCHED:
        return
    from vllm.v1.core.sched.scheduler import Scheduler

    for name, original in _PATCHED.items():
        setattr(Scheduler, name, original)
    _PATCHED.clear()
