"""Engine-core side: file each step's rows by KV-cache slot; hand a stopping request its logits.

Per step, the worker's rows (``records``) go into ``logit_store.CacheSlotLogits`` in one
vectorised write: no work per request or per row. When a request stops
(``Scheduler._handle_stopped_request``, called with its blocks still held and its token ids
final), its step candidates and their logits are read back (``FinishedLogits``) and queued for its
front-end client.

``EngineCoreOutputs`` (one batch per front-end client and step) cannot grow fields, but the
``kv_transfer_params`` dict of its outputs reaches the front end's output processor. A step's
stopped requests of one client travel as one payload, ``{request id: FinishedLogits payload}``, in
the first output of that client's batch (the batch holds the stopped requests' own outputs, so it
is never empty), under the namespaced key ``PAYLOAD_KEY``. A KV connector's own entries are kept
(the dict is copied, never replaced), and the front end removes the key before anything else
reads the dict.

Scored requests read the prefix cache like any other: a cached position's logit is in the slot
that its block table points at (``logit_store`` says why that is exact).
"""

from __future__ import annotations

import functools
import logging

from ..rule import StepRule
from . import config as sprm_config
from . import profile
from .logit_store import CacheSlotLogits
from .pruning import OPTION as PRUNE_OPTION
from .pruning import Pruner
from .records import RECORDS_ATTRIBUTE

logger = logging.getLogger("xbai_kernels.vllm")

PAYLOAD_KEY = "xbai_sprm"
# The stop reason of a candidate that a Best-of-N pruning policy stopped (finish reason "length").
PRUNED = "sprm_pruned"
# A preempted request's block table, noted when vLLM takes its blocks (see ``preempt_request``).
_PREEMPTED_BLOCKS = "_xbai_sprm_preempted_blocks"


class _SchedulerScoring:
    """Per-scheduler state: the logit store, the stopped requests' logits not yet sent (by client),
    and the requests that a Best-of-N pruning policy watches (``pruning.Pruner``)."""

    def __init__(self, store: CacheSlotLogits) -> None:
        self.store = store
        rule = store.rule
        self.pruner = Pruner(rule.step_token_ids, rule.think_start_id, rule.think_end_id)
        self.pruned: dict[int, dict[str, dict]] = {}  # by client: request id -> its pruning record
        self.stopped: dict[int, dict[str, list]] = {}
        # Requests with stop strings: the front end may end them, unseen here, at any step, so
        # their logits also go out as they are computed (positions delivered so far, by id).
        self.streamed: dict[str, int] = {}
        self.chunks: dict[int, dict[str, list]] = {}

    def stop(self, request, block_ids) -> None:
        self.streamed.pop(request.request_id, None)
        finished = self.store.finished_logits(request.all_token_ids, block_ids)
        self.stopped.setdefault(request.client_index, {})[request.request_id] = finished.to_payload()
        record = self.pruner.finish(request.request_id)
        if record is not None:
            self.pruned.setdefault(request.client_index, {})[request.request_id] = record

    def forget(self, request_id: str) -> None:
        """An aborted request: nothing of it is sent (the front end ended it)."""
        self.streamed.pop(request_id, None)
        self.pruner.finish(request_id)

    def prune(self, scheduler, outputs) -> None:
        """Let each watched request's policy see what it decoded this step, and stop the ones it
        prunes now (``_stop_pruned``)."""
        from vllm.v1.request import RequestStatus

        requests, store, manager = scheduler.requests, self.store, scheduler.kv_cache_manager

        def read(req_id, tokens, first):  # only when a step or a marker came: the usual step reads nothing
            return store.finished_logits(tokens, manager.get_block_ids(req_id)[0], first_position=first)

        stopping = []
        for req_id in list(self.pruner.watched):
            request = requests.get(req_id)
            if request is None:  # members leave on their stop hook or abort (``finish_requests``): a safety net
                self.forget(req_id)
                continue
            if request.status != RequestStatus.RUNNING:
                continue  # preempted: read on once it runs again (its positions are recomputed)
            if self.pruner.observe(req_id, request.all_token_ids, read):
                stopping.append(request)
        if stopping:
            _stop_pruned(scheduler, stopping, outputs)

    def stream(self, requests, kv_cache_manager) -> None:
        """Queue the newly computed logits of each live stop-string request (called once a step's
        tokens are appended: positions below ``num_tokens - 1`` are computed and filed)."""
        for req_id, delivered in list(self.streamed.items()):
            request = requests.get(req_id)
            if request is None:  # as in ``prune``
                self.forget(req_id)
                continue
            end = request.num_tokens - 1
            if request.num_output_tokens == 0 or end <= delivered:
                continue  # still prefilling, or nothing new
            block_ids = kv_cache_manager.get_block_ids(req_id)[0]
            if not block_ids:
                continue  # preempted: its positions come back as it recomputes them
            chunk = self.store.finished_logits(
                request.all_token_ids[delivered : end + 1], block_ids, first_position=delivered
            )
            self.streamed[req_id] = end
            self.chunks.setdefault(request.client_index, {})[req_id] = chunk.to_payload()
            # A stop string ends the request in the front end, where no stop hook runs: its pruning
            # record travels with each chunk (the front end keeps the latest).
            record = self.pruner.record(req_id)
            if record is not None:
                self.pruned.setdefault(request.client_index, {})[req_id] = record

    def attach(self, outputs) -> None:
        """Put each client's stopped requests (and stop-string chunks, pruning records) on the first
        output of its batch of this step."""
        for client in self.stopped.keys() | self.chunks.keys():
            batch = outputs.get(client)
            if batch is None or not batch.outputs:  # the client is gone: nothing reads it
                continue
            payload = {"stopped": self.stopped.get(client, {}), "chunks": self.chunks.get(client, {})}
            if client in self.pruned:
                payload["pruned"] = self.pruned[client]
            carrier = batch.outputs[0]
            params = carrier.kv_transfer_params
            carrier.kv_transfer_params = {**params, PAYLOAD_KEY: payload} if params else {PAYLOAD_KEY: payload}
        self.stopped.clear()
        self.chunks.clear()
        self.pruned.clear()


def _stop_pruned(scheduler, requests, outputs) -> None:
    """Finish pruned running requests now, as vLLM finishes one that reached its length limit:
    the stop hook reads their logits, their blocks are freed, and each gets a final output without
    new tokens (finish reason "length", stop reason ``PRUNED``), so the front end returns what they
    decoded. A step of theirs already in flight (async scheduling) is dropped when it returns."""
    from vllm.v1.core.sched.utils import remove_all
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.request import RequestStatus

    for request in requests:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        request.stop_reason = PRUNED
        scheduler._handle_stopped_request(request)
        kv_transfer_params, _ = scheduler._free_request(request)
        batch = outputs.get(request.client_index)
        if batch is None:
            batch = outputs[request.client_index] = EngineCoreOutputs(outputs=[])
        batch.outputs.append(
            EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=request.get_finished_reason(),
                stop_reason=request.stop_reason,
                events=request.take_events(),
                kv_transfer_params=kv_transfer_params,
                trace_headers=request.trace_headers,
            )
        )
    scheduler.running = remove_all(scheduler.running, set(requests))


def _scoring(scheduler) -> _SchedulerScoring | None:
    """The scheduler's scoring state, built on first use; None when the engine scores nothing."""
    state = scheduler.__dict__.get("_xbai_sprm")
    if state is None:
        state = scheduler.__dict__["_xbai_sprm"] = _build(scheduler) or False
    return state or None


def _build(scheduler) -> _SchedulerScoring | None:
    model_config = scheduler.vllm_config.model_config
    if model_config.runner_type != "generate" or sprm_config.head_location(model_config) is None:
        return None
    from vllm.tokenizers import cached_tokenizer_from_config

    kv_cache_config = scheduler.kv_cache_manager.kv_cache_config
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"xbai_kernels SPRM scoring keeps logits by KV-cache slot and needs one KV-cache group; this "
            f"model has {len(groups)}. Turn scoring off with XBAI_SPRM=0 / hf_overrides={{'xbai_sprm': False}}."
        )
    tokenizer = cached_tokenizer_from_config(model_config)
    rule = StepRule.from_tokenizer(tokenizer, lang=sprm_config.step_language(model_config))
    block_size = groups[0].kv_cache_spec.block_size
    return _SchedulerScoring(CacheSlotLogits(kv_cache_config.num_blocks, block_size, rule))


def add_request(original):
    """``Scheduler.add_request``: note a scored request with stop strings (see ``stream``)."""

    @functools.wraps(original)
    def wrapper(self, request, *args, **kwargs):
        scoring = _scoring(self)
        params = request.sampling_params
        if scoring is not None and params is not None:
            if params.stop:
                scoring.streamed.setdefault(request.request_id, 0)
            if params.extra_args and PRUNE_OPTION in params.extra_args:
                scoring.pruner.add(request.request_id, params.extra_args)
        return original(self, request, *args, **kwargs)

    return wrapper


def finish_requests(original):
    """``Scheduler.finish_requests`` (the front end aborts requests, e.g. a client that went away): no
    stop hook runs for those, so forget them here."""

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        finished = original(self, *args, **kwargs)
        scoring = _scoring(self)
        if scoring is not None:
            for request in finished or ():
                scoring.forget(request.request_id)
        return finished

    return wrapper


def handle_stopped_request(original):
    """``Scheduler._handle_stopped_request``: read the stopping request's logits while it still holds
    its blocks (vLLM frees them right after, or keeps a resumable request going)."""

    @functools.wraps(original)
    def wrapper(self, request, *args, **kwargs):
        scoring = _scoring(self)
        if scoring is not None and request.sampling_params is not None:
            start = profile.now() if profile.ENABLED else 0
            block_ids = self.kv_cache_manager.get_block_ids(request.request_id)[0]
            scoring.stop(request, block_ids or request.__dict__.get(_PREEMPTED_BLOCKS, ()))
            if profile.ENABLED:
                profile.add("scheduler.finish", profile.now() - start)
        return original(self, request, *args, **kwargs)

    return wrapper


def preempt_request(original):
    """``Scheduler._preempt_request``: note the block table vLLM takes away. With async scheduling a
    request can stop on the output of a step that was in flight when it was preempted; vLLM holds
    its blocks back from reuse until that output is processed, so its logits are still readable."""

    @functools.wraps(original)
    def wrapper(self, request, *args, **kwargs):
        if _scoring(self) is not None:
            request.__dict__[_PREEMPTED_BLOCKS] = self.kv_cache_manager.get_block_ids(request.request_id)[0]
        return original(self, request, *args, **kwargs)

    return wrapper


def update_from_output(original):
    @functools.wraps(original)
    def wrapper(self, scheduler_output, model_runner_output, *args, **kwargs):
        scoring = _scoring(self)
        if scoring is None:
            return original(self, scheduler_output, model_runner_output, *args, **kwargs)
        rows = getattr(model_runner_output, RECORDS_ATTRIBUTE, None)
        if rows is not None:
            start = profile.now() if profile.ENABLED else 0
            scoring.store.write(rows)
            if profile.ENABLED:
                profile.add("scheduler", profile.now() - start)
        outputs = original(self, scheduler_output, model_runner_output, *args, **kwargs)
        if scoring.pruner.watched:
            start = profile.now() if profile.ENABLED else 0
            scoring.prune(self, outputs)
            if profile.ENABLED:
                profile.add("scheduler.prune", profile.now() - start)
        if scoring.streamed:
            scoring.stream(self.requests, self.kv_cache_manager)
        if scoring.stopped or scoring.chunks:
            scoring.attach(outputs)
        return outputs

    return wrapper
