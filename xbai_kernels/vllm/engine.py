"""Engine-core side: carry the worker's step records from ``ModelRunnerOutput`` to the front end.

``EngineCoreOutputs`` (one batch per front-end client and step) cannot grow fields, but the
``kv_transfer_params`` dict of its outputs reaches the front end's output processor. A step's
records for one client travel as one payload, ``{"records": {request id: (positions, logits)}}``,
in the first output of that client's batch, under the namespaced key ``PAYLOAD_KEY``; the first
payload to a client also carries the step rule (``"rule"``), which the front end has no config to
build. A KV connector's own entries are kept (the dict is copied, never replaced), and the front
end removes the key before anything else reads the dict. So the per-step cost is a dict merge over
the step's scored rows, never a pass over the batch's requests.

A batch without outputs for a client (every request of it in a partial prefill chunk) leaves its
records pending until the client's next batch. Scored requests read the prefix cache: a cached
position is never computed again, so the scheduler keeps the recorded logits by KV block and hands
a request that hits the cache the logits of the hit (``prefix_cache``), shortening the hit where a
needed logit is not kept.
"""

from __future__ import annotations

import functools
import logging

from ..rule import StepRule
from . import config as sprm_config
from . import profile
from .prefix_cache import PrefixLogits
from .records import RECORDS_ATTRIBUTE, Records

logger = logging.getLogger("xbai_kernels.vllm")

PAYLOAD_KEY = "xbai_sprm"
# Every this many steps the prefix store drops what it waits to keep for requests that are gone.
_SWEEP_STEPS = 64


class _PendingRecords:
    """Per-scheduler state: records not yet sent, by client, and the clients already sent the rule."""

    def __init__(self, rule: StepRule, prefix: PrefixLogits | None = None) -> None:
        self.by_client: dict[int, Records] = {}
        self.announced: set[int] = set()
        self.rule_payload = [list(rule.step_token_ids), rule.think_start_id, rule.think_end_id]
        self.prefix = prefix  # None: scored requests do not read the prefix cache
        self.steps = 0

    def add(self, records: Records, requests) -> None:
        """Queue a step's records under each request's client (looked up before the step's finished
        requests leave ``requests``; records of requests already gone are dropped), and keep them
        for later prefix-cache hits."""
        for req_id, (positions, logits) in records.items():
            request = requests.get(req_id)
            if request is None:
                continue
            if self.prefix is not None:
                for reader, position, logit in self.prefix.store(request, positions, logits):
                    self.queue(reader, [position], [logit])
            self.queue(request, positions, logits)

    def queue(self, request, positions: list[int], logits: list[float]) -> None:
        """Queue one request's records for its client's next batch (from the worker, or a prefix-cache
        hit's kept logits)."""
        queued = self.by_client.setdefault(request.client_index, {})
        entry = queued.setdefault(request.request_id, ([], []))
        entry[0].extend(positions)
        entry[1].extend(logits)

    def attach(self, client: int, engine_core_outputs) -> None:
        """Put this client's queued records (and, the first time, the rule) on the batch's first output."""
        if not engine_core_outputs.outputs or (client in self.announced and client not in self.by_client):
            return
        payload = {"records": self.by_client.pop(client, {})}
        if client not in self.announced:
            payload["rule"] = self.rule_payload
            self.announced.add(client)
        carrier = engine_core_outputs.outputs[0]
        params = carrier.kv_transfer_params
        carrier.kv_transfer_params = {**params, PAYLOAD_KEY: payload} if params else {PAYLOAD_KEY: payload}


def _pending(scheduler) -> _PendingRecords:
    pending = scheduler.__dict__.get("_xbai_sprm_pending")
    if pending is None:
        from vllm.tokenizers import cached_tokenizer_from_config

        model_config = scheduler.vllm_config.model_config
        tokenizer = cached_tokenizer_from_config(model_config)
        rule = StepRule.from_tokenizer(tokenizer, lang=sprm_config.step_language(model_config))
        pending = scheduler.__dict__["_xbai_sprm_pending"] = _PendingRecords(rule, _prefix_logits(scheduler, rule))
        # The KV cache manager's patched lookup reaches the records through it.
        scheduler.kv_cache_manager._xbai_sprm_pending = pending
    return pending


def _prefix_logits(scheduler, rule: StepRule) -> PrefixLogits | None:
    """A logit store for prefix-cache hits, when the cache is on and one full-attention group whose
    block size is the hash's makes a block hash name a block of the request's positions."""
    if not scheduler.cache_config.enable_prefix_caching:
        return None
    groups = scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups
    block_size = scheduler.cache_config.block_size
    if len(groups) != 1 or getattr(groups[0].kv_cache_spec, "block_size", None) != block_size:
        logger.info("xbai_kernels: this KV cache layout keeps scored requests off the prefix cache")
        return None
    return PrefixLogits(rule, block_size)


def _scoring_on(scheduler) -> bool:
    cached = scheduler.__dict__.get("_xbai_sprm_on")
    if cached is None:
        model_config = scheduler.vllm_config.model_config
        cached = model_config.runner_type == "generate" and sprm_config.head_location(model_config) is not None
        scheduler.__dict__["_xbai_sprm_on"] = cached
    return cached


def add_request(original):
    @functools.wraps(original)
    def wrapper(self, request, *args, **kwargs):
        if _scoring_on(self) and request.sampling_params is not None and _pending(self).prefix is None:
            request.skip_reading_prefix_cache = True
        return original(self, request, *args, **kwargs)

    return wrapper


def get_computed_blocks(original):
    """``KVCacheManager.get_computed_blocks``: a scored request reads as much of its prefix-cache hit as
    the kept logits can score, and gets those logits as records (``prefix_cache``)."""

    @functools.wraps(original)
    def wrapper(self, request, *args, **kwargs):
        result = original(self, request, *args, **kwargs)
        pending = self.__dict__.get("_xbai_sprm_pending")
        blocks, num_tokens = result[0], result[1]
        if pending is None or pending.prefix is None or request.sampling_params is None:
            return result
        usable, positions, logits = pending.prefix.serve(request, num_tokens)
        if positions:
            pending.queue(request, positions, logits)
        if usable == num_tokens:
            return result
        kept = usable // pending.prefix.block_size
        trimmed = type(blocks)(tuple(list(group[:kept]) for group in blocks.blocks))
        return (trimmed, usable, *result[2:])

    return wrapper


def update_from_output(original):
    @functools.wraps(original)
    def wrapper(self, scheduler_output, model_runner_output, *args, **kwargs):
        records = getattr(model_runner_output, RECORDS_ATTRIBUTE, None)
        if records is None:
            return original(self, scheduler_output, model_runner_output, *args, **kwargs)
        start = profile.now() if profile.ENABLED else 0
        pending = _pending(self)
        if records:
            pending.add(records, self.requests)
        if profile.ENABLED:
            profile.add("scheduler", profile.now() - start)
        outputs = original(self, scheduler_output, model_runner_output, *args, **kwargs)
        start = profile.now() if profile.ENABLED else 0
        for client, engine_core_outputs in outputs.items():
            pending.attach(client, engine_core_outputs)
        pending.steps += 1
        if pending.prefix is not None and pending.steps % _SWEEP_STEPS == 0:
            pending.prefix.forget_gone(self.requests)
        if profile.ENABLED:
            profile.add("scheduler", profile.now() - start, calls=0)
        return outputs

    return wrapper
