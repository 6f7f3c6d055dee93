"""Scored requests read vLLM's prefix cache: the logits of cached positions come from the request that computed them.

A position read from the prefix cache is never computed again, so the worker records no logit for
it. The scheduler therefore keeps the logits recorded at scored positions by KV block
(``request.block_hashes``: a block's hash names its whole prefix, so equal hashes mean equal
hidden states there) and hands a request that hits the cache the logits of the positions it needs:

* kept ones at once;
* those of blocks another request is computing right now (the n samples of one prompt are
  scheduled together, the later ones reading the first one's blocks in the same step) as soon as
  that request's records arrive, which is before the reader's own output of that step;
* a needed position nobody will record (its logit was evicted, or it ends the hit and its step
  token lies past it, where the computing request may have had another token) shortens the hit
  to the blocks before it, so those tokens are recomputed and the scores stay exact.

Only a single-group, full-attention KV cache whose block size is the hash's is served; other
layouts keep scored requests off the cache read.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import semantics
from ..rule import StepRule

# Blocks whose logits are kept (least recently used out first); a block holds at most a few
# scored positions, so this is a few MB.
CAPACITY_BLOCKS = 1 << 16

Delivery = tuple[object, int, float]  # (waiting request, position, logit)


class PrefixLogits:
    """The scheduler's logits by KV block: ``{block hash: {offset in block: logit}}``, and the blocks
    being computed with the requests waiting for their logits."""

    def __init__(self, rule: StepRule, block_size: int, capacity: int = CAPACITY_BLOCKS) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self.think_start_id = rule.think_start_id
        self.step_table = rule.step_table("cpu").numpy()
        self.by_block: OrderedDict[object, dict[int, float]] = OrderedDict()
        # Records of positions whose block is not full yet (no hash): kept until it is.
        self.unhashed: dict[str, list[tuple[int, float]]] = {}
        # Blocks a scheduled request computes (until it leaves the scheduler): hash -> its id, and
        # per computing request (request, its block hashes).
        self.in_flight: dict[object, str] = {}
        self.computing: dict[str, tuple[object, list]] = {}
        self.waiters: dict[object, list[tuple[object, int]]] = {}  # hash -> [(request, offset)]

    def store(self, request, positions, logits) -> list[Delivery]:
        """Keep a request's new records under their blocks' hashes (blocks not full wait); returns
        what requests waiting on those blocks get."""
        waiting = self.unhashed.pop(request.request_id, [])
        waiting.extend(zip(positions, logits))
        hashes, size = request.block_hashes, self.block_size
        left, deliveries = [], []
        for position, logit in waiting:
            block = position // size
            if block >= len(hashes):
                left.append((position, logit))
                continue
            key = hashes[block]
            entry = self.by_block.get(key)
            if entry is None:
                entry = self.by_block[key] = {}
            else:
                self.by_block.move_to_end(key)
            offset = position % size
            entry[offset] = logit
            readers = self.waiters.get(key)
            if readers:
                deliveries += [(reader, position, logit) for reader, wanted in readers if wanted == offset]
                readers[:] = [(reader, wanted) for reader, wanted in readers if wanted != offset]
        if left:
            self.unhashed[request.request_id] = left
        while len(self.by_block) > self.capacity:
            self.by_block.popitem(last=False)
        return deliveries

    def serve(self, request, num_hit_tokens: int) -> tuple[int, list[int], list[float]]:
        """How many of the ``num_hit_tokens`` cached tokens (a multiple of the block size) the request
        may read, and the kept logits of the scored positions among them: (tokens, positions,
        logits). Positions of blocks being computed are registered to be delivered later."""
        if num_hit_tokens == 0:
            self._computes(request, 0)
            return 0, [], []
        size = self.block_size
        tokens = np.asarray(request.all_token_ids[: num_hit_tokens + 1], dtype=np.int64)
        needed = np.flatnonzero(semantics.opens_step(tokens[:-1], tokens[1:], self.step_table, self.think_start_id))
        hashes = request.block_hashes
        positions, logits, awaited = [], [], []
        usable = num_hit_tokens
        for position in needed.tolist():
            block = position // size
            entry = self.by_block.get(hashes[block])
            logit = None if entry is None else entry.get(position % size)
            if logit is not None:
                positions.append(position)
                logits.append(logit)
            elif self._will_record(hashes, block, position, num_hit_tokens):
                awaited.append((block, position % size))
            else:  # nobody will record it: read only the blocks before this one
                usable = block * size
                break
        for block, offset in awaited:
            if block * size < usable:
                self.waiters.setdefault(hashes[block], []).append((request, offset))
        keep = int(np.searchsorted(np.asarray(positions, dtype=np.int64), usable))
        for block in range(usable // size):  # blocks in use stay kept
            if hashes[block] in self.by_block:
                self.by_block.move_to_end(hashes[block])
        self._computes(request, usable)
        return usable, positions[:keep], logits[:keep]

    def _will_record(self, hashes, block: int, position: int, num_hit_tokens: int) -> bool:
        """Whether the request computing ``block`` right now records ``position``: it has the same
        tokens up to the block's end, so it does when the token after the position is its too, i.e.
        inside the block, or in the next block when that block is the same (same hash)."""
        computer = self.in_flight.get(hashes[block])
        if computer is None or position + 1 >= num_hit_tokens:
            return False
        theirs = self.computing[computer][0]
        if theirs.is_finished():  # gone before its records came: nobody will deliver
            return False
        if (position + 1) // self.block_size == block:
            return True
        theirs = theirs.block_hashes
        return len(theirs) > block + 1 and theirs[block + 1] == hashes[block + 1]

    def _computes(self, request, num_cached_tokens: int) -> None:
        """Note the full blocks the request computes from ``num_cached_tokens`` on."""
        keys = [key for key in request.block_hashes[num_cached_tokens // self.block_size :] if key not in self.in_flight]
        for key in keys:
            self.in_flight[key] = request.request_id
        if keys:
            previous = self.computing.get(request.request_id, (request, []))[1]
            self.computing[request.request_id] = (request, previous + keys)

    def forget_gone(self, live_requests) -> None:
        """Drop what concerns requests the scheduler no longer holds: the blocks they were computing
        (and readers still waiting on them, whose scores then report the missing positions), and
        their records waiting for a block hash."""
        for request_id in [r for r in self.computing if r not in live_requests]:
            for key in self.computing.pop(request_id)[1]:
                self.in_flight.pop(key, None)
                self.waiters.pop(key, None)
        for request_id in [r for r in self.unhashed if r not in live_requests]:
            del self.unhashed[request_id]
