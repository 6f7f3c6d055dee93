"""Scored requests read vLLM's prefix cache: the logits of cached positions come from the request that computed them.

A position read from the prefix cache is never computed again, so the worker records no logit for
it. The scheduler therefore keeps the logits recorded at scored positions by KV block
(``request.block_hashes``: a block's hash names its whole prefix, so equal hashes mean equal
hidden states there) and, when a request's prompt hits the cache, hands it the logits of the
positions it needs from the hit. A needed position whose logit is not kept (never recorded
because the token after it differed where it was computed, evicted, or not yet back from the
worker) shortens the hit to the blocks before it: those tokens are recomputed, so the scores stay
exact. Only a single-group, full-attention KV cache whose block size is the hash's is served;
other layouts keep scored requests off the cache read, as before.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import semantics
from ..rule import StepRule

# Blocks whose logits are kept (least recently used out first); a block holds at most a few
# scored positions, so this is a few MB.
CAPACITY_BLOCKS = 1 << 16


class PrefixLogits:
    """The scheduler's logits by KV block: ``{block hash: {offset in block: logit}}``."""

    def __init__(self, rule: StepRule, block_size: int, capacity: int = CAPACITY_BLOCKS) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self.think_start_id = rule.think_start_id
        self.step_table = rule.step_table("cpu").numpy()
        self.by_block: OrderedDict[object, dict[int, float]] = OrderedDict()
        # Records of positions whose block is not full yet (no hash): kept until it is.
        self.unhashed: dict[str, list[tuple[int, float]]] = {}

    def store(self, request, positions, logits) -> None:
        """Keep a request's new records under their blocks' hashes (blocks not full wait)."""
        waiting = self.unhashed.pop(request.request_id, [])
        waiting.extend(zip(positions, logits))
        hashes, size = request.block_hashes, self.block_size
        left = []
        for position, logit in waiting:
            block = position // size
            if block >= len(hashes):
                left.append((position, logit))
                continue
            entry = self.by_block.get(hashes[block])
            if entry is None:
                entry = self.by_block[hashes[block]] = {}
            else:
                self.by_block.move_to_end(hashes[block])
            entry[position % size] = logit
        if left:
            self.unhashed[request.request_id] = left
        while len(self.by_block) > self.capacity:
            self.by_block.popitem(last=False)

    def forget_gone(self, live_requests) -> None:
        """Drop the waiting records of requests the scheduler no longer holds."""
        for request_id in [r for r in self.unhashed if r not in live_requests]:
            del self.unhashed[request_id]

    def serve(self, request, num_hit_tokens: int) -> tuple[int, list[int], list[float]]:
        """How many of the ``num_hit_tokens`` cached tokens (a multiple of the block size) the request
        may read, and the logits of the scored positions among them: (tokens, positions, logits)."""
        size = self.block_size
        tokens = np.asarray(request.all_token_ids[: num_hit_tokens + 1], dtype=np.int64)
        opens = semantics.opens_step(tokens[:-1], tokens[1:], self.step_table, self.think_start_id)
        needed = np.flatnonzero(opens)
        positions, logits = [], []
        hashes = request.block_hashes
        for position in needed.tolist():
            entry = self.by_block.get(hashes[position // size])
            logit = None if entry is None else entry.get(position % size)
            if logit is None:  # read only the blocks before this one
                cut = position // size * size
                keep = _before(positions, cut)
                return cut, positions[:keep], logits[:keep]
            positions.append(position)
            logits.append(logit)
        for block in range(num_hit_tokens // size):  # used blocks stay kept
            if hashes[block] in self.by_block:
                self.by_block.move_to_end(hashes[block])
        return num_hit_tokens, positions, logits


def _before(positions: list[int], limit: int) -> int:
    """How many of the ascending ``positions`` lie before ``limit``."""
    return int(np.searchsorted(np.asarray(positions, dtype=np.int64), limit))
