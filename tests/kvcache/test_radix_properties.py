"""Property tests: the radix cache against a brute-force oracle, driven like the engine drives it.

The oracle stores every cached page-aligned prefix ``(namespace, tokens[:end])`` with the slots
of its last page, its last-access time and its lock count. Longest prefix = the longest stored
prefix; eviction = repeatedly drop the least-recently-used unlocked prefix that has no cached
extension. The tree evicts whole nodes, which the oracle does page by page, so the oracle is asked
to evict exactly as many tokens as the tree reports and the two freed sets must agree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from radixlm.kvcache import PageAllocator, RadixCache, TreeNode

NUM_PAGES = 20
NAMESPACES = [None, "salt"]


@dataclass
class Unit:
    slots: tuple[int, ...]
    time: int
    locks: int = 0


class Oracle:
    """Brute-force model of the cache at page granularity."""

    def __init__(self, page_size: int):
        self.ps = page_size
        self.units: dict[tuple, Unit] = {}
        self.clock = 0

    def longest(self, ns, tokens: list[int]) -> int:
        length = 0
        for end in range(self.ps, len(tokens) + 1, self.ps):
            if (ns, tuple(tokens[:end])) not in self.units:
                break
            length = end
        return length

    def prefix_units(self, ns, tokens: list[int], length: int) -> list[Unit]:
        return [self.units[(ns, tuple(tokens[:e]))] for e in range(self.ps, length + 1, self.ps)]

    def match(self, ns, tokens: list[int]) -> tuple[int, list[int]]:
        length = self.longest(ns, tokens)
        self.clock += 1
        slots: list[int] = []
        for unit in self.prefix_units(ns, tokens, length):
            unit.time = self.clock
            slots.extend(unit.slots)
        return length, slots

    def insert(self, ns, tokens: list[int], slots: list[int]) -> int:
        aligned = len(tokens) - len(tokens) % self.ps
        present, _ = self.match(ns, tokens[:aligned])
        for end in range(present + self.ps, aligned + 1, self.ps):
            key = (ns, tuple(tokens[:end]))
            self.units[key] = Unit(tuple(slots[end - self.ps : end]), self.clock)
        return present

    def lock(self, ns, tokens: list[int], length: int, delta: int) -> None:
        for unit in self.prefix_units(ns, tokens, length):
            unit.locks += delta
            assert unit.locks >= 0

    def evictable_leaves(self) -> list[tuple]:
        parents = {(ns, t[: -self.ps]) for ns, t in self.units if len(t) > self.ps}
        return [k for k, u in self.units.items() if u.locks == 0 and k not in parents]

    def evict(self, num_tokens: int) -> list[tuple[tuple, Unit]]:
        """Evict exactly ``num_tokens`` tokens page by page in LRU order; returns them in order."""
        out = []
        for _ in range(num_tokens // self.ps):
            leaves = self.evictable_leaves()
            assert leaves, "tree evicted more than the oracle can"
            times = sorted(self.units[k].time for k in leaves)
            assert len(times) < 2 or times[0] < times[1], "two LRU leaves share a time"
            key = min(leaves, key=lambda k: self.units[k].time)
            out.append((key, self.units.pop(key)))
        return out

    def token_counts(self) -> tuple[int, int]:
        locked = sum(1 for u in self.units.values() if u.locks) * self.ps
        return len(self.units) * self.ps, locked


@dataclass(eq=False)  # identity: LiveSeq holds arrays
class LiveSeq:
    ns: str | None
    tokens: list[int]
    slots: np.ndarray  # slots of every token (and the spare rest of the last page)
    tree_len: int  # slots[:tree_len] belong to the tree (locked through node)
    node: TreeNode


class Harness:
    """Drives an allocator + cache the way the engine's KV manager does, checking the oracle."""

    def __init__(self, page_size: int, num_pages: int = NUM_PAGES):
        self.ps = page_size
        self.alloc = PageAllocator(num_pages, page_size, first_slot=page_size)
        self.tree_freed: list[np.ndarray] = []
        self.cache = RadixCache(page_size, free_fn=self._tree_free)
        self.oracle = Oracle(page_size)
        self.live: list[LiveSeq] = []

    def _tree_free(self, slots: np.ndarray) -> None:
        self.tree_freed.append(slots.copy())
        self.alloc.free(slots)

    def _free(self, slots: np.ndarray) -> None:
        if slots.size:
            self.alloc.free(slots)

    def _round_up(self, n: int) -> int:
        return -(-n // self.ps) * self.ps

    def match(self, ns, tokens: list[int]):
        result = self.cache.match_prefix(tokens, namespace=ns)
        length, slots = self.oracle.match(ns, tokens)
        assert result.length == length, f"matched {result.length}, oracle {length}"
        assert result.slots.tolist() == slots, "matched slots differ from the oracle's"
        return result

    def insert(self, ns, tokens: list[int], slots: np.ndarray) -> int:
        present = self.cache.insert(tokens, slots, namespace=ns)
        expected = self.oracle.insert(ns, tokens, slots.tolist())
        assert present == expected, f"insert reports {present} present, oracle {expected}"
        return present

    def evict(self, num_tokens: int) -> int:
        before = self.cache.evictable_tokens()
        locked = {s for u in self.oracle.units.values() if u.locks for s in u.slots}
        self.tree_freed.clear()
        got = self.cache.evict(num_tokens)
        freed = np.concatenate(self.tree_freed).tolist() if self.tree_freed else []
        assert len(freed) == got and got % self.ps == 0
        assert got >= min(num_tokens, before), f"evicted {got} of {num_tokens}, {before} evictable"
        assert not locked & set(freed), "a locked slot was evicted"
        order = self.oracle.evict(got)
        assert sorted(freed) == sorted(s for _, u in order for s in u.slots), "not LRU leaves"
        self._check_no_overshoot(order, num_tokens)
        return got

    def _check_no_overshoot(self, order: list, num_tokens: int) -> None:
        """Past ``num_tokens`` the tree may only finish the node it was evicting."""
        count = 0
        for i, (key, unit) in enumerate(order):
            if count >= num_tokens:
                prev_key, prev_unit = order[i - 1]
                assert unit.time == prev_unit.time and key == (prev_key[0], prev_key[1][: -self.ps])
            count += self.ps

    def start(self, ns, tokens: list[int]) -> bool:
        result = self.match(ns, tokens)
        self.cache.lock(result.node)
        self.oracle.lock(ns, tokens, result.length, +1)
        need = self._round_up(len(tokens) - result.length)
        own = self.alloc.alloc(need)
        if own is None:
            self.evict(need - self.alloc.free_tokens)
            own = self.alloc.alloc(need)
        if own is None:
            self.cache.unlock(result.node)
            self.oracle.lock(ns, tokens, result.length, -1)
            return False
        slots = np.concatenate([result.slots, own])
        self.live.append(LiveSeq(ns, tokens, slots, result.length, result.node))
        return True

    def checkpoint(self, seq: LiveSeq, computed: int) -> None:
        """Cache a computed prefix of a running sequence and re-lock on the tree's copy."""
        aligned = computed - computed % self.ps
        if aligned <= seq.tree_len:
            return
        present = self.insert(seq.ns, seq.tokens[:aligned], seq.slots[:aligned])
        self._free(seq.slots[seq.tree_len : max(present, seq.tree_len)])
        result = self.match(seq.ns, seq.tokens[:aligned])
        assert result.length == aligned
        self.cache.lock(result.node)
        self.oracle.lock(seq.ns, seq.tokens, aligned, +1)
        self.cache.unlock(seq.node)
        self.oracle.lock(seq.ns, seq.tokens, seq.tree_len, -1)
        seq.slots = np.concatenate([result.slots, seq.slots[aligned:]])
        seq.tree_len, seq.node = aligned, result.node

    def finish(self, seq: LiveSeq) -> None:
        n = len(seq.tokens)
        aligned = n - n % self.ps
        present = self.insert(seq.ns, seq.tokens, seq.slots[:n])
        self._free(seq.slots[seq.tree_len : max(present, seq.tree_len)])
        self._free(seq.slots[aligned:])
        self.cache.unlock(seq.node)
        self.oracle.lock(seq.ns, seq.tokens, seq.tree_len, -1)
        self.live.remove(seq)

    def insert_fresh(self, ns, tokens: list[int]) -> None:
        """Insert a sequence computed without a prior match (all slots its own)."""
        slots = self.alloc.alloc(self._round_up(len(tokens)))
        if slots is None:
            return
        present = self.insert(ns, tokens, slots[: len(tokens)])
        self._free(slots[:present])
        self._free(slots[len(tokens) - len(tokens) % self.ps :])

    def reset(self) -> None:
        self.cache.reset()
        self.oracle.units.clear()

    def check(self) -> None:
        own = [seq.slots[seq.tree_len :] for seq in self.live]
        self.cache.check_invariants(self.alloc, own)
        total, locked = self.oracle.token_counts()
        assert self.cache.total_tokens() == total
        assert self.cache.locked_tokens() == locked
        assert self.cache.evictable_tokens() == total - locked

    def release_all(self) -> None:
        for seq in list(self.live):
            self.finish(seq)
        self.check()
        self.reset()
        assert self.alloc.free_tokens == self.alloc.capacity_tokens


def _bases(page_size: int) -> list[list[int]]:
    rng = random.Random(page_size)
    return [[rng.randrange(3) for _ in range(4 * page_size)] for _ in range(3)]


def token_lists(page_size: int) -> st.SearchStrategy[list[int]]:
    """Keys that share prefixes often and diverge at arbitrary (also mid-page) offsets."""
    shared = st.tuples(
        st.sampled_from(_bases(page_size)),
        st.integers(0, 4 * page_size),
        st.lists(st.integers(0, 2), max_size=2 * page_size),
    ).map(lambda t: t[0][: t[1]] + t[2])
    return st.one_of(shared, st.lists(st.integers(0, 2), max_size=5 * page_size))


class RadixMachine(RuleBasedStateMachine):
    page_size = 1

    def __init__(self):
        super().__init__()
        self.h = Harness(self.page_size)

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data())
    def start(self, ns, data):
        self.h.start(ns, data.draw(token_lists(self.page_size)))

    @precondition(lambda self: self.h.live)
    @rule(data=st.data())
    def checkpoint(self, data):
        seq = data.draw(st.sampled_from(self.h.live))
        self.h.checkpoint(seq, data.draw(st.integers(0, len(seq.tokens))))

    @precondition(lambda self: self.h.live)
    @rule(data=st.data())
    def finish(self, data):
        self.h.finish(data.draw(st.sampled_from(self.h.live)))

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data())
    def match(self, ns, data):
        self.h.match(ns, data.draw(token_lists(self.page_size)))

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data())
    def insert_fresh(self, ns, data):
        self.h.insert_fresh(ns, data.draw(token_lists(self.page_size)))

    @rule(num_tokens=st.integers(0, 12))
    def evict(self, num_tokens):
        self.h.evict(num_tokens * self.page_size // 2)

    @precondition(lambda self: not self.h.live)
    @rule()
    def reset(self):
        self.h.reset()

    @invariant()
    def consistent(self):
        self.h.check()

    def teardown(self):
        self.h.release_all()


class RadixMachinePaged(RadixMachine):
    page_size = 4


_SETTINGS = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestRadixPage1 = RadixMachine.TestCase
TestRadixPage1.settings = _SETTINGS
TestRadixPage4 = RadixMachinePaged.TestCase
TestRadixPage4.settings = _SETTINGS


@pytest.mark.parametrize("page_size", [1, 4])
def test_long_random_workload_leaks_nothing(page_size: int):
    """Thousands of mixed operations, then release everything and flush: free == capacity."""
    rng = random.Random(1234 + page_size)
    h = Harness(page_size, num_pages=64)
    bases = _bases(page_size)

    def key() -> list[int]:
        base = rng.choice(bases)
        return base[: rng.randrange(len(base) + 1)] + [
            rng.randrange(3) for _ in range(rng.randrange(3 * page_size))
        ]

    for step in range(1500):
        op = rng.random()
        if op < 0.35:
            h.start(rng.choice(NAMESPACES), key())
        elif op < 0.5 and h.live:
            seq = rng.choice(h.live)
            h.checkpoint(seq, rng.randrange(len(seq.tokens) + 1))
        elif op < 0.75 and h.live:
            h.finish(rng.choice(h.live))
        elif op < 0.85:
            h.insert_fresh(rng.choice(NAMESPACES), key())
        elif op < 0.95:
            h.match(rng.choice(NAMESPACES), key())
        else:
            h.evict(rng.randrange(4 * page_size))
        if step % 50 == 0:
            h.check()
    assert h.cache.total_tokens() > 0, "workload never filled the cache"
    h.release_all()
