"""RadixCache unit behaviour: splits, page alignment, namespaces, locking, LRU, disabled mode."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.kvcache import PageAllocator, RadixCache
from radixlm.kvcache.radix_tree import _common_prefix_bytes


def make(page_size: int = 1, num_pages: int = 64, disabled: bool = False):
    alloc = PageAllocator(num_pages, page_size, first_slot=page_size)
    return alloc, RadixCache(page_size, free_fn=alloc.free, disabled=disabled)


def cache_seq(alloc: PageAllocator, cache: RadixCache, tokens: list[int], ns=None) -> np.ndarray:
    """Insert ``tokens`` with fresh slots the way a finished request would; returns its slots."""
    ps = cache.page_size
    slots = alloc.alloc(-(-len(tokens) // ps) * ps)
    present = cache.insert(tokens, slots[: len(tokens)], namespace=ns)
    aligned = len(tokens) - len(tokens) % ps
    for part in (slots[:present], slots[aligned:]):
        if part.size:
            alloc.free(part)
    return slots


def test_empty_tree_matches_nothing_at_root():
    _, cache = make()
    result = cache.match_prefix([1, 2, 3])
    assert result.length == 0 and result.node is cache.root and result.slots.size == 0


def test_insert_reports_present_prefix_and_match_returns_its_slots():
    alloc, cache = make()
    first = cache_seq(alloc, cache, [1, 2, 3, 4])
    second = alloc.alloc(6)
    assert cache.insert([1, 2, 3, 9, 9, 9], second) == 3
    alloc.free(second[:3])
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == first[:4].tolist()
    hit = cache.match_prefix([1, 2, 3, 9, 9, 9, 9])
    assert hit.length == 6
    assert hit.slots.tolist() == first[:3].tolist() + second[3:].tolist()
    assert cache.total_tokens() == 7
    cache.check_invariants(alloc)


def test_match_inside_an_edge_splits_and_old_handles_keep_their_prefix():
    alloc, cache = make()
    cache_seq(alloc, cache, [5, 6, 7, 8])
    full = cache.match_prefix([5, 6, 7, 8])
    cache.lock(full.node)
    half = cache.match_prefix([5, 6, 0])
    assert half.length == 2 and half.node is not full.node
    assert full.node.parent is half.node  # the split put the upper half above the old node
    cache.lock(half.node)
    assert cache.locked_tokens() == 4
    cache.unlock(full.node)
    assert cache.locked_tokens() == 2 and cache.evictable_tokens() == 2
    cache.unlock(half.node)
    cache.check_invariants(alloc)


def test_page_alignment():
    alloc, cache = make(page_size=4)
    slots = cache_seq(alloc, cache, list(range(10)))  # 8 tokens cached, the tail freed
    assert cache.total_tokens() == 8
    assert cache.match_prefix(list(range(7))).length == 4
    hit = cache.match_prefix([0, 1, 2, 3, 4, 5, 6, 0, 0])  # diverges mid-page: whole pages only
    assert hit.length == 4 and hit.slots.tolist() == slots[:4].tolist()
    assert cache.match_prefix([0, 1, 2]).length == 0
    cache.check_invariants(alloc)


def test_namespaces_never_share():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2, 3], ns="a")
    assert cache.match_prefix([1, 2, 3]).length == 0
    assert cache.match_prefix([1, 2, 3], namespace="b").length == 0
    assert cache.match_prefix([1, 2, 3], namespace="a").length == 3
    cache_seq(alloc, cache, [1, 2, 3])
    assert cache.total_tokens() == 6
    cache.check_invariants(alloc)


def test_keys_may_be_tensors_or_tuples():
    alloc, cache = make()
    cache_seq(alloc, cache, [4, 5, 6])
    assert cache.match_prefix(torch.tensor([4, 5, 7])).length == 2
    assert cache.match_prefix((4, 5, 6, 7)).length == 3


def test_token_ids_outside_int32_are_rejected():
    alloc, cache = make()
    with pytest.raises(ValueError):
        cache.match_prefix([1, 2**31])
    with pytest.raises(ValueError):
        cache.match_prefix(torch.tensor([-(2**31) - 1]))


def test_locking_an_evicted_node_raises():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2])
    node = cache.match_prefix([1, 2]).node
    assert cache.evict(2) == 2
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(node)


def test_insert_keeps_a_copy_of_the_slots():
    alloc, cache = make()
    slots = alloc.alloc(3)
    expected = slots.tolist()
    cache.insert([1, 2, 3], slots)
    slots.fill(0)  # the caller reuses its buffer
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == expected


def test_unlock_of_unlocked_node_raises():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2])
    node = cache.match_prefix([1, 2]).node
    with pytest.raises(RuntimeError):
        cache.unlock(node)
    cache.lock(cache.root)  # roots are accepted and ignored
    cache.unlock(cache.root)


def test_evict_takes_least_recently_used_leaf_and_spares_locked():
    alloc, cache = make()
    slots_a = cache_seq(alloc, cache, [1, 1])
    cache_seq(alloc, cache, [2, 2])
    slots_c = cache_seq(alloc, cache, [3, 3])
    cache.match_prefix([1, 1])  # a is now more recent than b
    locked = cache.match_prefix([3, 3]).node
    cache.lock(locked)  # c is the most recent but locked
    assert cache.evict(1) == 2
    assert cache.match_prefix([2, 2]).length == 0
    assert cache.evict(100) == 2  # only a is left to evict
    assert cache.match_prefix([3, 3]).slots.tolist() == slots_c[:2].tolist()
    assert set(slots_a[:2].tolist()) <= alloc.free_slot_set()
    cache.unlock(locked)
    cache.check_invariants(alloc)


def test_evict_cascades_to_parents_that_become_leaves():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2, 3])
    cache_seq(alloc, cache, [1, 2, 3, 4, 5])  # a 3-token parent with a 2-token leaf
    assert cache.evict(4) == 5
    assert cache.total_tokens() == 0 and alloc.free_tokens == alloc.capacity_tokens


def test_reset_frees_all_and_refuses_while_locked():
    alloc, cache = make(page_size=2)
    cache_seq(alloc, cache, [1, 2, 3, 4])
    cache_seq(alloc, cache, [7, 8], ns="x")
    node = cache.match_prefix([1, 2]).node
    cache.lock(node)
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert cache.total_tokens() == 0 and alloc.free_tokens == alloc.capacity_tokens
    assert cache.match_prefix([7, 8], namespace="x").length == 0


def test_disabled_mode_keeps_nothing():
    alloc, cache = make(page_size=2, disabled=True)
    slots = alloc.alloc(4)
    assert cache.insert([1, 2, 3], slots[:3]) == 0  # takes (and frees) the aligned 2
    assert alloc.free_tokens == alloc.capacity_tokens - 2
    alloc.free(slots[2:])  # the unaligned tail stays the caller's
    hit = cache.match_prefix([1, 2, 3])
    assert hit.length == 0 and hit.node is cache.root
    assert cache.total_tokens() == 0 and cache.evict(10) == 0
    cache.check_invariants(alloc)


def test_check_invariants_catches_leaks_and_double_ownership():
    alloc, cache = make()
    slots = cache_seq(alloc, cache, [1, 2])
    live = alloc.alloc(2)
    cache.check_invariants(alloc, [live])
    with pytest.raises(AssertionError, match="leaked"):
        cache.check_invariants(alloc)
    with pytest.raises(AssertionError, match="more than one place"):
        cache.check_invariants(alloc, [live, slots[:1]])


def _brute_common(a, b) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=300, deadline=None)
@given(
    a=st.lists(st.integers(0, 300), max_size=40),
    b=st.lists(st.integers(0, 300), min_size=1, max_size=40),
    start=st.integers(0, 5),
    cut=st.integers(0, 5),
)
def test_common_prefix_bytes_matches_brute_force(a, b, start, cut):
    start, end = min(start, len(a)), max(min(start, len(a)), len(a) - cut)
    pa, pb = (struct.pack(f"={len(x)}i", *x) for x in (a, b))
    got = _common_prefix_bytes(pa, 4 * start, 4 * end, pb)
    assert got == _brute_common(pa[4 * start : 4 * end], pb)
    assert got // 4 == _brute_common(a[start:end], b)  # whole tokens agree
