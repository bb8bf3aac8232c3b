"""PageAllocator: page-granular slots, exhaustion, double-free detection, a set-based oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.kvcache import PageAllocator


def test_slots_are_whole_pages_from_first_slot():
    alloc = PageAllocator(num_pages=3, page_size=4, first_slot=4)
    slots = alloc.alloc(8)
    assert isinstance(slots, np.ndarray) and slots.dtype == np.int64
    pages = slots.reshape(-1, 4)
    assert all(row.tolist() == list(range(row[0], row[0] + 4)) for row in pages)
    assert all(int(row[0]) % 4 == 0 and 4 <= int(row[0]) < 16 for row in pages)
    assert alloc.free_tokens == 4 and alloc.capacity_tokens == 12


@pytest.mark.parametrize("bad", [3, 5, -4])
def test_alloc_rejects_partial_pages(bad: int):
    with pytest.raises(ValueError):
        PageAllocator(4, 4, 4).alloc(bad)


def test_exhaustion_returns_none_and_takes_nothing():
    alloc = PageAllocator(num_pages=2, page_size=2, first_slot=2)
    assert alloc.alloc(6) is None
    assert alloc.free_tokens == 4
    assert alloc.alloc(4) is not None
    assert alloc.alloc(2) is None
    assert alloc.alloc(0).size == 0


def test_free_errors():
    alloc = PageAllocator(num_pages=4, page_size=2, first_slot=2)
    slots = alloc.alloc(4)
    with pytest.raises(ValueError, match="whole pages"):
        alloc.free(slots[:1])
    with pytest.raises(ValueError, match="outside"):
        alloc.free(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="more than once"):
        alloc.free(np.concatenate([slots[:2], slots[:2]]))
    assert alloc.free_tokens == 4  # a rejected free changes nothing
    alloc.free(slots)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(slots[2:])
    assert alloc.free_tokens == alloc.capacity_tokens


def test_free_accepts_whole_pages_in_any_order():
    alloc = PageAllocator(num_pages=3, page_size=2, first_slot=2)
    slots = alloc.alloc(6)
    alloc.free(slots[::-1])
    assert alloc.free_slot_set() == set(range(2, 8))


def test_reset_frees_everything():
    alloc = PageAllocator(num_pages=5, page_size=1, first_slot=1)
    alloc.alloc(3)
    alloc.reset()
    assert alloc.free_tokens == 5 and alloc.free_slot_set() == set(range(1, 6))


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.sampled_from([1, 4]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 100)), max_size=60),
)
def test_alloc_free_against_set_oracle(page_size: int, ops):
    num_pages = 8
    alloc = PageAllocator(num_pages, page_size, first_slot=page_size)
    universe = set(range(page_size, page_size * (num_pages + 1)))
    held: list[list[int]] = []  # the oracle: blocks handed out and not yet freed
    for is_alloc, pages, pick in ops:
        if is_alloc or not held:
            slots = alloc.alloc(pages * page_size)
            in_use = {s for block in held for s in block}
            if len(universe - in_use) < pages * page_size:
                assert slots is None
                continue
            assert slots is not None and len(slots) == pages * page_size
            assert not in_use & set(slots.tolist()), "a slot was handed out twice"
            held.append(slots.tolist())
        else:
            alloc.free(torch.tensor(held.pop(pick % len(held)), dtype=torch.int64))
        in_use = {s for block in held for s in block}
        assert alloc.free_slot_set() == universe - in_use
        assert alloc.free_tokens == len(universe - in_use)
        alloc.check_invariants()
