"""Per-worker scoring state: the head, the step rule, the ``h`` buffer the model writes, the recorder.

Kept free of vLLM imports so the device-side step (``worker._run_update``) can be exercised alone,
on a GPU where vLLM is not installed.
"""

from __future__ import annotations

import torch

from ..head import SPRMHead
from ..rule import StepRule
from .recorder import StepLogitRecorder


class SPRMRuntime:
    """What one worker needs to score: the head, the step rule, the ``h`` buffer and the recorder.

    hidden [max_tokens, d] (model dtype) is written by every forward; next_prompt_ids int64
    [max_requests] on the device, and host buffers (pinned on CUDA) for the per-step copies.
    """

    def __init__(self, head: SPRMHead, rule: StepRule, vocab_size: int, max_tokens: int, max_requests: int, dtype):
        device = head[0].weight.device
        self.head = head
        self.rule = rule
        self.hidden = torch.zeros(max_tokens, head.hidden_size, dtype=dtype, device=device)
        self.recorder = StepLogitRecorder(head, rule, vocab_size, max_tokens, max_requests)
        self.next_prompt_ids = torch.zeros(max_requests, dtype=torch.int64, device=device)
        self.host = [HostBuffers(max_tokens, max_requests, pinned=device.type == "cuda") for _ in range(HOST_RING)]
        self.steps = 0
        self.layout = None  # the current step's _StepLayout, set by the runner patch

    def next_host_buffers(self) -> "HostBuffers":
        self.steps += 1
        return self.host[self.steps % len(self.host)]


# With async scheduling the engine runs a step ahead of reading the previous one's output; a ring
# of host buffers keeps a step's copies intact until they are read.
HOST_RING = 3


class HostBuffers:
    """Host side of one step's copies: next prompt ids to the device, (is_step, logits) back."""

    def __init__(self, max_tokens: int, max_requests: int, pinned: bool) -> None:
        self.next_prompt_ids = torch.zeros(max_requests, dtype=torch.int64, pin_memory=pinned)
        self.is_step = torch.zeros(max_tokens, dtype=torch.bool, pin_memory=pinned)
        self.logits = torch.zeros(max_tokens, dtype=torch.float32, pin_memory=pinned)
