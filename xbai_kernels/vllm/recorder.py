"""The device-side work the plugin adds to one engine step: the head's logit at every candidate position.

One engine step runs T scheduled tokens of R requests packed back to back (``query_start_loc``).
Token j sits at some position i of its request; SPEC scores i when token i+1 is a step token and
token i is neither a step token nor ``<think>`` (the thinking-region rule needs the whole
trajectory and is applied when the request finishes, see ``results``). Token i+1 is the next
packed token, except for the last token of each request, where it is the token just sampled, or,
for a partial prefill chunk (whose sample vLLM throws away), the next prompt token.

Everything here is fixed-shape device work with no host synchronization, so it can run on the
GPU path between sampling and vLLM's own host copy, and inside a captured CUDA graph.
"""

from __future__ import annotations

import torch

from ..head import SPRMHead
from ..ops import dispatch, reference
from ..rule import StepRule


class StepLogitRecorder:
    """Persistent buffers and the per-step update: ``is_step`` bool [T] and ``logits`` float32 [T].

    ``vocab_size`` sizes the step-token lookup table (membership by gather: no sort, no sync);
    ``max_tokens`` and ``max_requests`` bound T and R of one step.
    """

    def __init__(
        self, head: SPRMHead, rule: StepRule, vocab_size: int, max_tokens: int, max_requests: int
    ) -> None:
        device = head[0].weight.device
        self.head = head
        self.rule = rule
        self.device = device
        table_size = max(vocab_size, rule.think_start_id + 1, rule.think_end_id + 1)
        self.is_step_token = rule.step_table(device, size=table_size)
        self.next_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.is_step = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self.logits = torch.zeros(max_tokens, dtype=torch.float32, device=device)
        self.max_tokens = max_tokens
        self.max_requests = max_requests

    def _lookup(self, token_ids: torch.Tensor) -> torch.Tensor:
        return reference.is_step_token(token_ids, self.is_step_token)

    @torch.no_grad()
    def update(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        last_rows: torch.Tensor,
        sampled_ids: torch.Tensor,
        discard: torch.Tensor,
        next_prompt_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record one step of T tokens and R requests; returns views (is_step [T], logits [T]).

        hidden [T, d]: ``h`` of every scheduled token; input_ids int [T]: the tokens themselves;
        last_rows int [R]: index of each request's last token (``query_start_loc[1:] - 1``);
        sampled_ids int [R]: the token sampled after it; discard bool [R]: partial prefill rows,
        whose sample is thrown away; next_prompt_ids int [R]: for those rows, the next prompt token.
        The returned views are overwritten by the next call.
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
        following[-1:].fill_(-1)
        last_next = torch.where(discard, next_prompt_ids.long(), sampled_ids.long())
        following.index_copy_(0, last_rows.long(), last_next)

        is_step = self.is_step[:num_tokens]
        torch.logical_and(self._lookup(following), ~self._lookup(current), out=is_step)
        is_step &= current != self.rule.think_start_id
        logits = self.logits[:num_tokens]
        dispatch.call("head_logits_masked", hidden.device, hidden, is_step, *self.head.weights, out=logits)
        return is_step, logits
