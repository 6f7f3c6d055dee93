"""The scheduler's logits by KV block (``prefix_cache.PrefixLogits``), with stand-in requests: what a
prefix-cache hit may read, which logits it gets at once, which later, and where it is cut."""

from __future__ import annotations

from types import SimpleNamespace

from xbai_kernels import StepRule
from xbai_kernels.vllm.prefix_cache import PrefixLogits

STEP, THINK, END = 5, 1, 2
RULE = StepRule((STEP,), THINK, END)
BLOCK = 4


def _request(request_id: str, tokens: list[int]):
    # A block's hash names its whole prefix: the tuple of the tokens up to its end.
    hashes = [tuple(tokens[: (b + 1) * BLOCK]) for b in range(len(tokens) // BLOCK)]
    return SimpleNamespace(request_id=request_id, all_token_ids=tokens, block_hashes=hashes,
                           is_finished=lambda: False)


def _candidates(tokens, limit):
    return [p for p in range(limit) if tokens[p + 1] == STEP and tokens[p] not in (STEP, THINK)]


# Scored positions 1, 5 and 7 (7 ends block 1: its step token starts block 2).
PROMPT = [9, 8, STEP, 9, 8, 7, STEP, 3, STEP, 9, 9, 9, 9, 9]


def test_a_hit_reads_kept_logits_and_is_cut_where_one_is_missing():
    cache = PrefixLogits(RULE, BLOCK)
    first = _request("a", PROMPT)
    assert cache.serve(first, 0) == (0, [], [])
    assert cache.store(first, [1, 5, 7], [0.5, 0.25, 0.125]) == []
    assert cache.serve(_request("b", PROMPT), 12) == (12, [1, 5, 7], [0.5, 0.25, 0.125])
    # A prompt sharing blocks 0-1 whose next token is no step: position 7 scores nothing there, so
    # a reader needing 7 from blocks that prompt computed (its step token lies past the hit) reads
    # only block 0.
    unscored_end = PROMPT[:8] + [4] * 6
    assert _candidates(unscored_end, 8) == [1, 5]
    cache = PrefixLogits(RULE, BLOCK)
    cache.serve(plain := _request("c", unscored_end), 0)
    cache.store(plain, [1, 5], [0.5, 0.25])
    assert cache.serve(_request("d", PROMPT), 8) == (4, [1], [0.5])


def test_evicted_logits_shorten_the_hit():
    cache = PrefixLogits(RULE, BLOCK, capacity=1)
    first = _request("a", PROMPT)
    cache.store(first, [1, 5, 7], [0.5, 0.25, 0.125])  # block 0's entry is evicted by block 1's
    assert cache.serve(_request("b", PROMPT), 12) == (0, [], [])


def test_positions_of_blocks_being_computed_are_delivered_when_they_arrive():
    cache = PrefixLogits(RULE, BLOCK)
    computer = _request("a", PROMPT)
    cache.serve(computer, 0)  # scheduled without a hit: it computes every full block
    reader = _request("b", PROMPT)
    assert cache.serve(reader, 12) == (12, [], [])  # nothing kept yet, all in flight
    deliveries = cache.store(computer, [1, 5, 7], [0.5, 0.25, 0.125])
    assert [(r.request_id, p, x) for r, p, x in deliveries] == [("b", 1, 0.5), ("b", 5, 0.25), ("b", 7, 0.125)]
    assert cache.store(computer, [1], [0.5]) == []  # delivered once


def test_a_gone_computer_delivers_nothing_and_readers_are_cut():
    cache = PrefixLogits(RULE, BLOCK)
    computer = _request("a", PROMPT)
    cache.serve(computer, 0)
    cache.forget_gone(live_requests={})
    assert cache.serve(_request("b", PROMPT), 12) == (0, [], [])
