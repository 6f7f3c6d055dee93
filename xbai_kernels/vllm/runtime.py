"""Per-worker scoring state: the head, the step rule, the ``h`` buffer the model writes, the recorder.

Kept free of vLLM imports so the device-side step can be exercised alone, on a GPU where vLLM is
not installed.
"""

from __future__ import annotations

import torch

from ..head import SPRMHead
from ..rule import StepRule
from .recorder import HOST_RING, EngineStepRecorder, HostStep, StepLogitRecorder


class SPRMRuntime:
    """What one worker needs to score: the head, the step rule, the ``h`` buffer and a recorder.

    hidden [max_tokens, d] (model dtype) is written by every forward. ``block_size`` is the KV
    cache's (every block's last position keeps its logit, ``logit_store``). ``runner`` names the vLLM
    model runner that drives it: ``"v2"`` builds an ``EngineStepRecorder`` (``engine``), ``"v1"`` a
    ``StepLogitRecorder`` (``recorder``) with its staging buffers, and on a CPU the numpy step work
    over ``hidden`` (``host_step``, a ``HostStep``).
    """

    def __init__(
        self, head: SPRMHead, rule: StepRule, vocab_size: int, max_tokens: int, max_requests: int, dtype,
        runner: str = "v1", block_size: int = 16,
    ):
        if runner not in ("v1", "v2"):
            raise ValueError(f"SPRMRuntime: runner must be 'v1' or 'v2', got {runner!r}")
        device = head[0].weight.device
        self.head = head
        self.rule = rule
        self.runner = runner
        self.hidden = torch.zeros(max_tokens, head.hidden_size, dtype=dtype, device=device)
        # Benchmarks switch recording off and on in a live engine (``set_recording``) to measure its cost.
        self.active = True
        self.engine = self.recorder = self.host_step = None
        if runner == "v2":
            self.engine = EngineStepRecorder(head, rule, vocab_size, max_tokens, max_requests, block_size)
            return
        self.recorder = StepLogitRecorder(head, rule, vocab_size, max_tokens, max_requests, block_size)
        if device.type == "cpu":  # the CPU engine records on the host, in numpy (``runner_v1._record_on_host``)
            self.host_step = HostStep(rule, self.recorder.is_step_token.numpy(), self.recorder.weights, self.hidden)
        self.next_prompt_ids = torch.zeros(max_requests, dtype=torch.int64, device=device)
        self.host = [HostBuffers(max_tokens, max_requests, pinned=device.type == "cuda") for _ in range(HOST_RING)]
        self.steps = 0
        self.layout = None  # the current step's _StepLayout, set by the V1 runner patch

    def next_host_buffers(self) -> "HostBuffers":
        self.steps += 1
        return self.host[self.steps % len(self.host)]


def set_recording(worker, active: bool) -> bool:
    """Turn a live engine's step recording off or on (a ``collective_rpc`` function: ``worker`` is the
    vLLM worker). Completions finished while it is off carry incomplete scores; benchmarks only.
    Returns whether the worker holds a scoring model."""
    runtime = getattr(worker.model_runner.model, "sprm", None)
    if runtime is not None:
        runtime.active = bool(active)
    return runtime is not None


class HostBuffers:
    """Host side of one V1 step's copies: next prompt ids to the device, the step's rows back
    (int32 [2, T], ``records``' layout)."""

    def __init__(self, max_tokens: int, max_requests: int, pinned: bool) -> None:
        # Explicitly on the CPU: vLLM builds the model under a CUDA default device.
        self.next_prompt_ids = torch.zeros(max_requests, dtype=torch.int64, device="cpu", pin_memory=pinned)
        self.rows = torch.zeros(2 * max_tokens, dtype=torch.int32, device="cpu", pin_memory=pinned)
