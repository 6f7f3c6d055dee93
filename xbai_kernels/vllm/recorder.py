"""The device-side work the plugin adds to one engine step: which rows keep a logit, and the head's logit.

One engine step runs T scheduled tokens of R requests packed back to back (``query_start_loc``).
Token j sits at some position i of its request; SPEC scores i when token i+1 is a step token and
token i is neither a step token nor ``<think>`` (the thinking-region rule needs the whole
trajectory and is applied when the request finishes). Token i+1 is the next packed token, except
for the last token of each request, where it is the token just sampled, or, for a partial prefill
chunk (whose sample vLLM throws away), the next prompt token. A row also keeps its logit when it
is the last position of its KV block (``logit_store`` says why). Each row leaves the step as its
KV-cache slot and logit (``records``).

Two recorders, one per vLLM model runner, both fixed-shape device work with no host sync:

* ``EngineStepRecorder`` (Model Runner V2, the GPU default): V2 keeps every request's tokens, the
  one just sampled included, in a table by request, so the token after a request's last row is
  read there, on the device. A step is one replay of a CUDA graph captured per padded batch size:
  the requests' table rows (a few hundred bytes) go up, the rule and the head run, and per row
  the cache slot and the logit (NaN where none is kept) come back to pinned memory.
* ``StepLogitRecorder`` (the V1 runner, which the CPU engine uses): V1 hands over the sampled ids
  and the partial-prefill flags as device tensors, so the token after each request's last row is
  assembled from those.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import semantics
from ..head import SPRMHead
from ..ops import dispatch
from ..rule import StepRule

logger = logging.getLogger("xbai_kernels.vllm")


def _engine_copy(src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor | None = None, fill: int = 0) -> None:
    if keep is not None:  # ``copy_int32``'s contract: the last len(keep) values become fill where not kept
        src = src.clone()
        src[src.numel() - keep.numel() :].masked_fill_(~keep, fill)
    dst.copy_(src, non_blocking=True)


def _staging_copy(device: torch.device):
    """How the staging bytes move: by a kernel on a GPU (``ops.triton.staging``), else by the copy
    engine. Imported only for a GPU, so a CPU process never builds the Triton kernel."""
    if device.type == "cuda":
        try:
            from ..ops.triton.staging import copy_int32

            return copy_int32
        except Exception as exc:  # no usable Triton: the copy engine
            logger.info("xbai_kernels: staging copies by the copy engine (%s)", exc)
    return _engine_copy


# float32 NaN as int32 bits: the logit of a row that keeps none.
_NAN_BITS = int(np.array(np.nan, dtype=np.float32).view(np.int32))

# With async scheduling the engine runs a step ahead of reading the previous one's output; a ring
# of host buffers keeps a step's copies intact until they are read.
HOST_RING = 3


def _step_table(rule: StepRule, vocab_size: int, device) -> torch.Tensor:
    # Ids up to the vocabulary and both markers fit, so every id the engine can produce is looked up.
    size = max(vocab_size, rule.think_start_id + 1, rule.think_end_id + 1)
    return rule.step_table(device, size=size)


class StepRows:
    """One step's rows on the host, valid once ``ready`` (a CUDA event, or None) has completed: a view
    of a ring buffer holding the cache slots of ``padded`` rows, then their logits' bits; the
    first ``num_rows`` of each are the step's (``records``' layout once read).

    Read it (``rows``) before ``HOST_RING`` further steps are recorded.
    """

    __slots__ = ("values", "num_rows", "padded", "ready", "read")

    def __init__(self, values: np.ndarray, num_rows: int, padded: int, ready) -> None:
        self.values = values
        self.num_rows = num_rows
        self.padded = padded
        self.ready = ready
        self.read = False

    def wait(self) -> None:
        # A query first: a completed step (the usual case) costs no GIL release, which would hand
        # the engine's other threads the GIL in the middle of its critical path.
        if self.ready is not None and not self.read and not self.ready.query():
            self.ready.synchronize()
        self.read = True

    def rows(self) -> np.ndarray:
        """int32 [2, n], a copy (``records``' layout); waits for the step's download."""
        self.wait()
        n, padded = self.num_rows, self.padded
        return self.values[: 2 * padded].reshape(2, padded)[:, :n].copy()


class EngineStepRecorder:
    """Model Runner V2's per-step scoring: plan once (buffers, backends, graphs), then one replay a step.

    ``max_tokens`` bounds the rows of one step (T, padding included), ``max_requests`` the
    requests (R), ``block_size`` is the KV cache's. Device buffers: ``table_rows`` int32 [R] (each
    request's row in the token table), ``keep`` bool [T] and ``output`` int32 [2 T] (for a step of
    n rows: the cache slots in ``[:n]``, the logits' float32 bits in ``[n:2n]``, so one contiguous
    copy brings both back). The row boundaries are vLLM's own device buffer, uploaded for its
    forward. Host side: a ring of ``HOST_RING`` pinned table-row and output buffers, and per
    (padded size, ring turn) a captured graph of the whole step (upload, kernels, download, the
    turn's event), so a step costs the host one numpy copy and one graph launch.
    """

    def __init__(
        self, head: SPRMHead, rule: StepRule, vocab_size: int, max_tokens: int, max_requests: int, block_size: int
    ) -> None:
        device = head[0].weight.device
        self.device = device
        # Detached views: recording never needs autograd, and the kernels refuse calls that do.
        self.weights = tuple(w.detach() for w in head.weights)
        self.think_start_id = rule.think_start_id
        self.step_table = _step_table(rule, vocab_size, device)
        self.max_tokens = max_tokens
        self.max_requests = max_requests
        self.block_size = block_size
        self.table_rows = torch.zeros(max_requests, dtype=torch.int32, device=device)
        self.keep = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self.output = torch.zeros(2 * max_tokens, dtype=torch.int32, device=device)
        on_cuda = device.type == "cuda"
        # Host staging, pinned so that the copies are asynchronous and can sit inside a CUDA graph.
        # (Explicitly on the CPU: vLLM builds the model under a CUDA default device.)
        self._host_table_rows = [
            torch.zeros(max_requests, dtype=torch.int32, device="cpu", pin_memory=on_cuda) for _ in range(HOST_RING)
        ]
        self._host_output = [
            torch.zeros(2 * max_tokens, dtype=torch.int32, device="cpu", pin_memory=on_cuda) for _ in range(HOST_RING)
        ]
        # Recorded inside each graph (an external event record node) when the runtime allows it,
        # else after the launch: waiting on it tells the host that its turn's buffers are final.
        # Blocking: the reader sleeps instead of spinning on a CPU core.
        self._ready = [torch.cuda.Event(external=True) if on_cuda else None for _ in range(HOST_RING)]
        self._event_in_graph = False
        self._turn = 0
        self._steps: list[StepRows | None] = [None] * HOST_RING  # the step each ring turn holds
        # Steps run as a graph replay / eagerly (no graph for the size, or inputs other than the
        # captured ones): a decode-heavy run that replays nothing has lost its graphs.
        self.replayed_steps = 0
        self.eager_steps = 0
        self._copy = _staging_copy(device)
        # Backends are chosen once: the hot path does no lookups.
        self._rows_op, self._head_op = dispatch.implementations(
            ("engine_step_rows", "head_logits_masked"), device, head.scoring_inputs()
        )
        # (padded rows, ring turn) -> a graph holding the table rows' upload, the two kernels and
        # the results' download into that turn's host buffers: one launch a step.
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._graph_inputs: tuple[torch.Tensor, ...] | None = None

    def _run(self, turn: int, num_rows: int, hidden, input_ids, positions, cache_slots, query_start_loc, token_ids) -> None:
        """Upload the table rows of ring ``turn``, run the kernels over rows [0, num_rows) (padding
        rows included), download slots and logits into that turn's host buffer."""
        self._copy(self._host_table_rows[turn], self.table_rows)
        query_start_loc = query_start_loc[: self.max_requests + 1]
        keep = self.keep[:num_rows]
        logits = self.output[num_rows : 2 * num_rows].view(torch.float32)
        self._rows_op(
            input_ids[:num_rows],
            positions[:num_rows],
            cache_slots[:num_rows],
            query_start_loc,
            self.table_rows,
            token_ids,
            self.step_table,
            self.think_start_id,
            self.block_size,
            keep,
            self.output[:num_rows],
        )
        self._head_op(hidden[:num_rows], keep, *self.weights, out=logits)
        # Down with the rows, in the same pass: NaN marks a row that keeps nothing (``records``).
        self._copy(self.output[: 2 * num_rows], self._host_output[turn][: 2 * num_rows], keep, _NAN_BITS)

    @torch.inference_mode()
    def capture(self, sizes, hidden, input_ids, positions, cache_slots, query_start_loc, token_ids) -> int:
        """Capture one CUDA graph per padded step size in ``sizes`` (vLLM's own capture sizes, so a
        padded decode step always finds its graph). The inputs are the engine's persistent buffers:
        their addresses are baked in, and ``record`` checks it gets the same tensors. Returns the count."""
        if self.device.type != "cuda":
            return 0
        limit = min(self.max_tokens, hidden.shape[0], input_ids.shape[0], positions.shape[0], cache_slots.shape[0])
        sizes = sorted({int(s) for s in sizes if 0 < int(s) <= limit})
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pool = torch.cuda.graph_pool_handle()
        inputs = (hidden, input_ids, positions, cache_slots, query_start_loc, token_ids)
        with torch.cuda.stream(stream):
            for size in sizes:  # warm-up: compilation and backend state, outside any capture
                self._run(0, size, *inputs)
        stream.synchronize()
        self._event_in_graph = True
        for size in sizes:
            for turn in range(HOST_RING):
                self._graphs[(size, turn)] = self._capture_one(pool, stream, turn, size, *inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graph_inputs = inputs
        return len(sizes)

    def _capture_one(self, pool, stream, turn, size, *inputs) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        if self._event_in_graph:
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    self._run(turn, size, *inputs)
                    self._ready[turn].record(stream)
                return graph
            except RuntimeError as exc:  # a runtime without event record nodes: record after the launch
                logger.info("xbai_kernels: CUDA graph event nodes unavailable (%s); recording events after replay", exc)
                self._event_in_graph = False
                graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self._run(turn, size, *inputs)
        return graph

    def record(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache_slots: torch.Tensor,
        query_start_loc: torch.Tensor,
        token_ids: torch.Tensor,
        table_rows: np.ndarray,
        num_rows: int,
        num_padded_rows: int,
    ) -> StepRows:
        """Record one step: hidden [>= n, d] (model dtype), input_ids int [>= n], positions int
        [>= n] and cache_slots int64 [>= n] of the scheduled rows, query_start_loc int32 [R + 1]
        (request r owns rows ``[qsl[r], qsl[r + 1])``, entries past the live requests repeat the
        row count, as vLLM pads its own), token_ids int32 [S, L] (every request's tokens by table
        row, the sampled one included) on the device, and table_rows int [live requests] on the
        host; n is ``num_padded_rows`` when a graph was captured for it, else ``num_rows``.
        Asynchronous."""
        num_requests = table_rows.shape[0]
        if num_padded_rows > self.max_tokens or num_requests > self.max_requests:
            raise ValueError(
                f"EngineStepRecorder: a step of {num_padded_rows} rows / {num_requests} requests exceeds "
                f"the buffers ({self.max_tokens} / {self.max_requests})"
            )
        turn = self._turn = (self._turn + 1) % HOST_RING
        previous = self._steps[turn]
        if previous is not None:
            previous.wait()  # read HOST_RING steps ago in the engine's order, so normally a no-op
        self._host_table_rows[turn].numpy()[:num_requests] = table_rows
        ready = self._ready[turn]
        inputs = (hidden, input_ids, positions, cache_slots, query_start_loc, token_ids)
        graph = self._graphs.get((num_padded_rows, turn))
        if graph is not None and all(a is b for a, b in zip(inputs, self._graph_inputs)):
            graph.replay()
            self.replayed_steps += 1
            rows = num_padded_rows
            if ready is not None and not self._event_in_graph:
                ready.record()
        else:
            self._run(turn, num_rows, *inputs)
            self.eager_steps += 1
            rows = num_rows
            if ready is not None:
                ready.record()
        step = self._steps[turn] = StepRows(self._host_output[turn].numpy(), num_rows, rows, ready)
        return step


class HostStep:
    """The CPU engine's step work on numpy arrays: every tensor there is host memory, and a dozen
    small torch ops, each entering the intra-op thread pool, cost more than the model's own step on
    a small model (numpy: a fraction of that).

    ``opens``: the step rule as two lookups (``semantics.opens_step_tables``, derived from the rule
    itself); ``logits``: the head on rows of the engine's ``hidden`` buffer, the oracle's math
    (``ops.reference.head_logits``, float32 throughout) with weights converted once.
    """

    def __init__(self, rule: StepRule, step_table: np.ndarray, weights, hidden: torch.Tensor) -> None:
        self.may_open, self.is_step = semantics.opens_step_tables(step_table, rule.think_start_id)
        w1, b1, w2, b2 = (w.detach().float().cpu() for w in weights)
        self.w1t = w1.T.contiguous().numpy()  # [d, 2d]
        self.b1 = b1.numpy()
        self.w2 = w2.reshape(-1).numpy()
        self.b2 = float(b2.reshape(()))
        # hidden [T, d] (a CPU tensor the model writes every step) as numpy: a bf16 is the top half
        # of an fp32's bits, so its rows convert exactly by a shift of their int16 view.
        self._bf16 = hidden.dtype == torch.bfloat16
        self._hidden = hidden.view(torch.int16).numpy().view(np.uint16) if self._bf16 else hidden.numpy()

    def opens(self, current: np.ndarray, following: np.ndarray) -> np.ndarray:
        """bool [n]: ``semantics.opens_step`` of ids in [0, V) followed by ids in [-1, V)."""
        return self.may_open[current] & self.is_step[following]

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """float32 [m]: the head of rows ``rows`` of ``hidden``."""
        selected = self._hidden[rows]
        hidden = (selected.astype(np.uint32) << 16).view(np.float32) if self._bf16 else selected.astype(np.float32, copy=False)
        activation = hidden @ self.w1t
        activation += self.b1
        np.maximum(activation, 0.0, out=activation)
        return activation @ self.w2 + np.float32(self.b2)


class StepLogitRecorder:
    """V1 runner's per-step update: ``keep`` bool [T] and ``logits`` float32 [T].

    ``vocab_size`` sizes the step-token lookup table (membership by gather: no sort, no sync);
    ``max_tokens`` and ``max_requests`` bound T and R of one step; ``block_size`` is the KV cache's.
    """

    def __init__(
        self, head: SPRMHead, rule: StepRule, vocab_size: int, max_tokens: int, max_requests: int, block_size: int
    ) -> None:
        device = head[0].weight.device
        self.head = head
        self.rule = rule
        self.device = device
        self.block_size = block_size
        self.is_step_token = _step_table(rule, vocab_size, device)
        self.next_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.keep = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self.logits = torch.zeros(max_tokens, dtype=torch.float32, device=device)
        self.max_tokens = max_tokens
        self.max_requests = max_requests
        (self._head_op,) = dispatch.implementations(("head_logits_masked",), device, head.scoring_inputs())
        self.weights = tuple(w.detach() for w in head.weights)  # recording needs no autograd

    def keeps(self, opens, positions):
        """The rows that keep a logit (torch or numpy): those opening a step, and every KV block's
        last position (``logit_store``)."""
        return opens | ((positions + 1) % self.block_size == 0)

    @torch.no_grad()
    def update(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        last_rows: torch.Tensor,
        sampled_ids: torch.Tensor,
        discard: torch.Tensor,
        next_prompt_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record one step of T tokens and R requests; returns views (keep [T], logits [T]).

        hidden [T, d]: ``h`` of every scheduled token; input_ids int [T] and positions int [T]: the
        tokens themselves and their positions; last_rows int [R]: index of each request's last
        token (``query_start_loc[1:] - 1``); sampled_ids int [R]: the token sampled after it;
        discard bool [R]: partial prefill rows, whose sample is thrown away; next_prompt_ids int
        [R]: for those rows, the next prompt token. The returned views are overwritten by the next call.
        """
        num_tokens = input_ids.shape[0]
        if num_tokens > self.max_tokens or last_rows.shape[0] > self.max_requests:
            raise ValueError(
                f"StepLogitRecorder: step of {num_tokens} tokens / {last_rows.shape[0]} requests exceeds "
                f"the buffers ({self.max_tokens} / {self.max_requests})"
            )
        current = input_ids.long()
        following = self.next_ids[:num_tokens]
        following[:-1].copy_(current[1:])
        following[-1:].fill_(semantics.NO_TOKEN)
        last_next = torch.where(discard, next_prompt_ids.long(), sampled_ids.long())
        following.index_copy_(0, last_rows.long(), last_next)

        opens = semantics.opens_step(current, following, self.is_step_token, self.rule.think_start_id)
        keep = self.keep[:num_tokens]
        keep.copy_(self.keeps(opens, positions.long()))
        logits = self.logits[:num_tokens]
        self._head_op(hidden, keep, *self.weights, out=logits)
        return keep, logits
