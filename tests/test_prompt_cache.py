"""The prompt cache's bookkeeping: exact block matches within the caller's limit, at least one token left to
prefill, a byte budget that drops least recently used blocks and keeps every remaining chain reachable."""

from __future__ import annotations

import torch

from service.engine.prompt_cache import PromptCache

BLOCK = 4


def kv(tokens: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values whose entries are the token ids, so a match shows which tokens it brought back."""
    t = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None]
    return [(t + i, -(t + i)) for i in range(layers)]


def block_bytes(layers: int = 2) -> int:
    return layers * 2 * BLOCK * 4


def test_a_match_is_the_longest_run_of_whole_cached_blocks_and_leaves_a_token() -> None:
    cache = PromptCache(max_bytes=10**6, block=BLOCK)
    ids = list(range(10, 22))  # three blocks
    cache.insert(ids, 0, kv(ids), limit=len(ids))
    assert len(cache) == 3
    assert cache.match(ids, limit=99).length == 8  # the third block would leave nothing to prefill
    longer = cache.match([*ids, 99], limit=99)
    assert longer.length == 12
    assert longer.layers[1][0].flatten().tolist() == [float(i + 1) for i in ids]  # per layer, in order
    assert cache.match([*ids, 99], limit=11).length == 8  # only within the caller's limit
    assert cache.match([*ids[:5], 0, *ids[6:], 1], limit=99).length == 4  # a different token ends the match
    assert cache.match([0, *ids], limit=99) is None


def test_only_blocks_within_the_limit_are_kept() -> None:
    cache = PromptCache(max_bytes=10**6, block=BLOCK)
    ids = list(range(10, 22))
    cache.insert(ids, 0, kv(ids), limit=7)  # e.g. the patient's own words start at token 7
    assert len(cache) == 1 and cache.match([*ids, 0], limit=99).length == 4


def test_extending_a_match_stores_only_the_new_blocks() -> None:
    cache = PromptCache(max_bytes=10**6, block=BLOCK)
    base = list(range(8))
    cache.insert(base, 0, kv(base), limit=99)
    prompt = [*base, 50, 51, 52, 53, 54]
    hit = cache.match(prompt, limit=99)
    assert hit.length == 8
    cache.insert(prompt, hit.length, kv(prompt[hit.length:]), limit=99, after=hit)
    assert len(cache) == 3
    again = cache.match([*prompt, 7], limit=99)
    assert again.length == 12 and again.layers[0][0].flatten().tolist() == [float(i) for i in prompt[:12]]


def test_blocks_under_a_dropped_prefix_are_not_stored() -> None:
    cache = PromptCache(max_bytes=2 * block_bytes(), block=BLOCK)
    a = [1, 1, 1, 1, 2, 2, 2, 2]
    cache.insert(a, 0, kv(a), limit=99)
    hit = cache.match([*a, 3, 3, 3, 3, 0], limit=99)
    b = [7, 7, 7, 7, 8, 8, 8, 8]
    cache.insert(b, 0, kv(b), limit=99)  # over the budget: a's blocks go
    assert cache.match([*a, 0], limit=99) is None
    cache.insert([*a, 3, 3, 3, 3, 0], hit.length, kv([3, 3, 3, 3, 0]), limit=99, after=hit)
    assert cache.bytes <= 2 * block_bytes() and cache.match([*b, 0], limit=99).length == 8


def test_the_budget_drops_least_recently_used_leaves_first() -> None:
    cache = PromptCache(max_bytes=4 * block_bytes(), block=BLOCK)
    a, b = [1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 3, 3, 3, 3]  # share the first block
    cache.insert(a, 0, kv(a), limit=99)
    cache.insert(b, 0, kv(b), limit=99)
    assert len(cache) == 3 and cache.bytes == 3 * block_bytes()
    assert cache.match([*a, 0], limit=99).length == 8  # a is now more recent than b
    c = [5, 5, 5, 5, 6, 6, 6, 6]
    cache.insert(c, 0, kv(c), limit=99)  # five blocks over a budget of four: b's own block goes, the shared one stays
    assert cache.bytes <= 4 * block_bytes() and len(cache) == 4
    assert cache.match([*b, 0], limit=99).length == 4
    assert cache.match([*a, 0], limit=99).length == 8 and cache.match([*c, 0], limit=99).length == 8


def test_nothing_is_kept_without_a_budget() -> None:
    cache = PromptCache(max_bytes=0, block=BLOCK)
    cache.insert(list(range(8)), 0, kv(list(range(8))), limit=99)
    assert len(cache) == 0 and cache.match(list(range(9)), limit=99) is None
