"""Radix tree of token ids over KV slots: the prefix cache behind RadixAttention.

Each edge holds a run of token ids (``key``) and the KV slots of those tokens (``slots``, an int64
numpy array of the same length; see :mod:`radixlm.slots`). The tree knows nothing of requests:
callers match a prefix, lock the node where the match ends while they use its slots, insert what
they computed, and unlock.

Page granularity: with ``page_size > 1`` only whole pages are cached, edges are split only at page
boundaries and children are keyed by their first page, so a cached prefix always ends on a page
boundary.

Representation: keys are packed int32 token ids (``bytes``). A query is packed once (one pass over
its Python ints, in C), after which every edge comparison is a ``memcmp`` (``bytes.startswith``)
with no per-token Python work and no slice copies; a cached token costs 4 bytes instead of a list
pointer plus an int object.

Recency: a logical clock ticks once per ``match_prefix``/``insert``; every node on the touched
path gets the tick. Eviction pops least-recently-used unlocked leaves from a lazy min-heap: an entry
whose node was touched after the push is pushed again with the new time instead of being evicted,
so each live node has at most one heap entry and the heap never needs a scan of the tree.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radixlm.slots import EMPTY_SLOTS, as_slot_array, concat_slots

_TOKEN_BYTES = 4  # keys are native-endian int32 token ids
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class TreeNode:
    """One edge of the tree and the node it leads to.

    Attributes:
        key: token ids of the edge, packed int32 (empty only for a namespace root); see
            ``token_ids()``.
        slots: KV slots of those tokens (int64 array, one per token of ``key``).
        children: child nodes keyed by their first page (packed token ids).
        parent: the parent node; None for a root and for a node that has been evicted.
        lock_ref: number of locks taken on this node or any node below it.
        last_access: logical time of the last match/insert that went through this node.
    """

    __slots__ = ("key", "slots", "children", "parent", "lock_ref", "last_access", "in_heap")

    def __init__(self, key: bytes, slots: np.ndarray, parent: TreeNode | None, now: int):
        self.key = key
        self.slots = slots
        self.children: dict[bytes, TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = now
        self.in_heap = False  # whether an eviction-heap entry for this node exists

    @property
    def num_tokens(self) -> int:
        """Tokens on this node's edge."""
        return len(self.key) // _TOKEN_BYTES

    def token_ids(self) -> list[int]:
        """The edge's token ids as a list (for debugging and tests; not used on hot paths)."""
        return list(struct.unpack(f"={self.num_tokens}i", self.key))

    def __repr__(self) -> str:
        return f"TreeNode(len={self.num_tokens}, lock_ref={self.lock_ref}, t={self.last_access})"


@dataclass(frozen=True)
class MatchResult:
    """The longest cached prefix of a key.

    Attributes:
        slots: KV slots of the matched tokens (int64 array, ``length`` long; a new array, never
            a view of the tree's own).
        node: the node where the match ends (the namespace root when nothing matched); pass it
            to ``lock``/``unlock``.
        length: matched tokens (a multiple of ``page_size``).
    """

    slots: np.ndarray
    node: TreeNode
    length: int


class RadixCache:
    """Prefix cache mapping token-id sequences to the KV slots that hold them.

    Args:
        page_size: tokens per KV page; only whole pages are cached and shared.
        free_fn: called with the slots of evicted (or reset) nodes, e.g. ``allocator.free``.
        disabled: never reuse anything: ``match_prefix`` matches nothing, ``insert`` hands every
            slot it is given straight to ``free_fn`` and returns 0, so nothing is ever held.
    """

    def __init__(
        self,
        page_size: int = 1,
        free_fn: Callable[[np.ndarray], None] | None = None,
        disabled: bool = False,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if free_fn is None:
            raise ValueError("RadixCache needs a free_fn (e.g. allocator.free)")
        self.page_size = page_size
        self.free_fn = free_fn
        self.disabled = disabled
        self._page_bytes = page_size * _TOKEN_BYTES
        self._heap_seq = itertools.count()
        self.reset_state()

    # ---- sizes ------------------------------------------------------------------------------

    def total_tokens(self) -> int:
        """Tokens held in the tree."""
        return self._evictable + self._locked

    def evictable_tokens(self) -> int:
        """Tokens held in unlocked nodes (all reclaimable by repeated eviction)."""
        return self._evictable

    def locked_tokens(self) -> int:
        """Tokens held in locked nodes."""
        return self._locked

    @property
    def root(self) -> TreeNode:
        """The root of the default (``None``) namespace."""
        return self._roots[None]

    def namespace_roots(self) -> dict[str | None, TreeNode]:
        """Each namespace's root (a copy of the mapping; the nodes are the tree's own)."""
        return dict(self._roots)

    @property
    def clock(self) -> int:
        """The logical time of the latest match or insert (``last_access`` counts in it)."""
        return self._clock

    # ---- lookup and insertion ---------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], namespace: str | None = None) -> MatchResult:
        """Find the longest cached (page-aligned) prefix of ``token_ids``.

        Splits a node when the match ends inside its edge, so that ``node`` ends exactly there,
        and marks every node on the path as just used.

        Args:
            token_ids: the key (list of ints, any sequence of ints, or a 1-D integer tensor);
                ids must fit in int32.
            namespace: keys in different namespaces never share anything.

        Returns:
            MatchResult with the matched slots, the node where the match ends, and its length.
        """
        root = self._namespace_root(namespace)
        if self.disabled:
            return MatchResult(concat_slots([]), root, 0)
        packed = _pack(token_ids)
        node, length, parts = self._descend(root, packed, _aligned(len(packed), self._page_bytes))
        return MatchResult(concat_slots(parts), node, length)

    def insert(
        self,
        token_ids: Sequence[int],
        slots: np.ndarray | torch.Tensor,
        namespace: str | None = None,
    ) -> int:
        """Cache the first ``floor(len / page_size) * page_size`` tokens of ``token_ids``.

        The tree keeps its own slots for tokens already present and takes ownership of (a copy
        of) ``slots[present:aligned]``. The caller still owns ``slots[:present]`` (duplicates
        of cached KV it should free unless they are the tree's own slots it matched earlier) and
        any unaligned tail ``slots[aligned:]``. In disabled mode ``slots[:aligned]`` are passed
        to ``free_fn`` at once and 0 is returned.

        Args:
            token_ids: the key.
            slots: KV slots of the key's tokens (int64 array, or a tensor); at least ``aligned``
                long.
            namespace: the key's namespace.

        Returns:
            ``present``: how many leading tokens were already cached.
        """
        packed = _pack(token_ids)
        end = _aligned(len(packed), self._page_bytes)
        aligned = end // _TOKEN_BYTES
        slots = as_slot_array(slots)
        if len(slots) < aligned:
            raise ValueError(f"insert(): {len(slots)} slots for {aligned} tokens")
        root = self._namespace_root(namespace)
        if self.disabled:
            if aligned:
                self.free_fn(slots[:aligned])
            return 0
        node, present, _ = self._descend(root, packed, end)
        if present < aligned:
            key = packed[present * _TOKEN_BYTES : end]
            self._add_leaf(node, key, slots[present:aligned].copy())
        return present

    # ---- locking ------------------------------------------------------------------------------

    def lock(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction (reference counted).

        Args:
            node: a node returned in a MatchResult; a root is accepted and ignored.

        Raises:
            RuntimeError: the node has been evicted (lock right after matching, before anything
                can evict it).
        """
        if node.parent is None and not self._is_root(node):
            raise RuntimeError(f"lock() of an evicted node {node!r}")
        while node.parent is not None:
            if node.lock_ref == 0:
                size = node.num_tokens
                self._evictable -= size
                self._locked += size
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Release one ``lock`` on ``node`` (and its path to the root).

        Args:
            node: the node previously passed to ``lock``.

        Raises:
            RuntimeError: the node is not locked.
        """
        if node.parent is not None and node.lock_ref <= 0:
            raise RuntimeError(f"unlock() of an unlocked node {node!r}")
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                size = node.num_tokens
                self._locked -= size
                self._evictable += size
                if not node.children:
                    self._push(node)
            node = node.parent

    # ---- eviction and reset -------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` cached tokens if that many are evictable.

        Takes least-recently-used unlocked leaves first; a parent left childless and unlocked
        becomes a candidate in turn. Whole nodes are evicted, so slightly more may be freed.

        Args:
            num_tokens: tokens wanted back.

        Returns:
            Tokens actually freed (their slots went to ``free_fn``).
        """
        freed: list[np.ndarray] = []
        count = 0
        while count < num_tokens and self._heap:
            queued_at, _, node = heapq.heappop(self._heap)
            node.in_heap = False
            if not _is_evictable_leaf(node):
                continue
            if node.last_access != queued_at:
                self._push(node)  # touched since it was pushed: requeue at its real time
                continue
            count += node.num_tokens
            freed.append(node.slots)
            self._remove_leaf(node)
        if freed:
            self.free_fn(concat_slots(freed))
        return count

    def reset(self) -> None:
        """Drop every cached prefix, handing all slots to ``free_fn``.

        Raises:
            RuntimeError: some node is locked (its slots are still in use).
        """
        if self._locked:
            raise RuntimeError(f"reset() with {self._locked} locked tokens in the radix cache")
        held = [node.slots for node in self._all_nodes()]
        self.reset_state()
        if held:
            self.free_fn(concat_slots(held))

    def reset_state(self) -> None:
        """Forget the whole tree without freeing anything (for when the pool itself is reset)."""
        self._clock = 0
        self._roots: dict[str | None, TreeNode] = {None: TreeNode(b"", EMPTY_SLOTS, None, 0)}
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._evictable = 0
        self._locked = 0

    # ---- invariants -------------------------------------------------------------------------

    def check_invariants(
        self, allocator: Any, live_slots: Iterable[np.ndarray | torch.Tensor] = ()
    ) -> None:
        """Assert the tree's structure and that every usable slot is in exactly one place.

        Args:
            allocator: the PageAllocator whose ``free_slots()`` and usable range are checked.
            live_slots: slots owned by live sequences (not in the tree, not free).

        Raises:
            AssertionError: with a message naming the broken invariant.
        """
        tree_slots: list[np.ndarray] = []
        evictable = locked = 0
        queued = self._check_heap()
        for node in self._all_nodes():
            self._check_node(node, queued)
            tree_slots.append(node.slots)
            if node.lock_ref:
                locked += node.num_tokens
            else:
                evictable += node.num_tokens
        assert (evictable, locked) == (self._evictable, self._locked), (
            f"counters evictable={self._evictable} locked={self._locked}, "
            f"tree holds evictable={evictable} locked={locked}"
        )
        if hasattr(allocator, "check_invariants"):
            allocator.check_invariants()
        _check_slot_partition(allocator, tree_slots, list(live_slots))

    # ---- internals --------------------------------------------------------------------------

    def _namespace_root(self, namespace: str | None) -> TreeNode:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = TreeNode(b"", EMPTY_SLOTS, None, 0)
        return root

    def _is_root(self, node: TreeNode) -> bool:
        return any(node is root for root in self._roots.values())

    def _child_key(self, key: bytes) -> bytes:
        """Children are keyed by their first page (a page is one token when page_size == 1)."""
        return key[: self._page_bytes]

    def _descend(
        self, root: TreeNode, packed: bytes, end: int
    ) -> tuple[TreeNode, int, list[np.ndarray]]:
        """Walk ``packed[:end]`` (bytes) from ``root``, touching the path; split where a match
        ends inside an edge.

        Returns:
            (node where the match ends, matched tokens, slot arrays along the path).
        """
        self._clock += 1
        now, page_bytes = self._clock, self._page_bytes
        node, pos, parts = root, 0, []
        while pos < end:
            child = node.children.get(packed[pos : pos + page_bytes])
            if child is None:
                break
            edge = len(child.key)
            diverged = pos + edge > end or not packed.startswith(child.key, pos)
            if diverged:
                # The first page matched (it is the child's dict key), so this is >= 1 page.
                edge = _aligned(_common_prefix_bytes(packed, pos, end, child.key), page_bytes)
                child = self._split(child, edge)
            child.last_access = now
            parts.append(child.slots)
            pos += edge
            node = child
            if diverged:
                break
        return node, pos // _TOKEN_BYTES, parts

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut ``child``'s edge ``at`` bytes in; returns the new upper node (``child`` stays the
        lower one, so handles to it still denote the same prefix)."""
        if at >= len(child.key):
            return child
        parent = child.parent
        assert parent is not None
        tokens = at // _TOKEN_BYTES
        upper = TreeNode(child.key[:at], child.slots[:tokens], parent, child.last_access)
        upper.lock_ref = child.lock_ref
        parent.children[self._child_key(upper.key)] = upper
        child.key = child.key[at:]
        child.slots = child.slots[tokens:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        return upper

    def _add_leaf(self, parent: TreeNode, key: bytes, slots: np.ndarray) -> None:
        leaf = TreeNode(key, slots, parent, self._clock)
        parent.children[self._child_key(key)] = leaf
        self._evictable += leaf.num_tokens
        self._push(leaf)

    def _remove_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[self._child_key(node.key)]
        node.parent = None
        self._evictable -= node.num_tokens
        if _is_evictable_leaf(parent):
            self._push(parent)

    def _push(self, node: TreeNode) -> None:
        """Queue an evictable leaf unless an entry for it is already queued.

        A queued entry may carry an older time than the node's; ``evict`` requeues it then.
        """
        if node.in_heap:
            return
        node.in_heap = True
        heapq.heappush(self._heap, (node.last_access, next(self._heap_seq), node))

    def _all_nodes(self) -> Iterable[TreeNode]:
        """Every non-root node (depth first)."""
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _check_heap(self) -> set[int]:
        """Ids of queued nodes; asserts one entry per node and the ``in_heap`` flags."""
        queued = [id(node) for _, _, node in self._heap]
        assert len(set(queued)) == len(queued), "a node is queued twice in the eviction heap"
        for _, _, node in self._heap:
            assert node.in_heap, f"queued {node!r} is not flagged in_heap"
        return set(queued)

    def _check_node(self, node: TreeNode, queued: set[int]) -> None:
        key_len, ps = node.num_tokens, self.page_size
        assert len(node.key) % _TOKEN_BYTES == 0, f"{node!r}: key of {len(node.key)} bytes"
        assert key_len > 0 and key_len % ps == 0, f"{node!r}: edge of {key_len} tokens (page {ps})"
        assert node.slots.ndim == 1 and node.slots.size == key_len, (
            f"{node!r}: key of {key_len} tokens but {tuple(node.slots.shape)} slots"
        )
        assert (
            node.parent is not None and node.parent.children.get(self._child_key(node.key)) is node
        ), f"{node!r}: not reachable from its parent under its first token/page"
        below = sum(child.lock_ref for child in node.children.values())
        assert node.lock_ref >= below >= 0, (
            f"{node!r}: lock_ref {node.lock_ref} < sum of children's lock_ref {below}"
        )
        for child in node.children.values():
            assert child.last_access <= node.last_access, (
                f"{child!r} was used after its parent {node!r}"
            )
        assert node.in_heap == (id(node) in queued), f"{node!r}: in_heap flag is wrong"
        if _is_evictable_leaf(node):
            assert node.in_heap, f"evictable leaf {node!r} has no eviction-heap entry"


def _is_evictable_leaf(node: TreeNode) -> bool:
    """A live, unlocked, childless non-root node."""
    return node.parent is not None and node.lock_ref == 0 and not node.children


def _pack(token_ids: Sequence[int] | torch.Tensor) -> bytes:
    """Token ids as native-endian int32 bytes."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.reshape(-1).cpu()
        if ids.numel() and (int(ids.min()) < _INT32_MIN or int(ids.max()) > _INT32_MAX):
            raise ValueError("token ids must fit in int32")
        return ids.to(torch.int32).numpy().tobytes()
    try:
        return struct.pack(f"={len(token_ids)}i", *token_ids)
    except struct.error as exc:
        raise ValueError(f"token ids must be ints that fit in int32: {exc}") from None


def _aligned(num_bytes: int, page_bytes: int) -> int:
    return num_bytes - num_bytes % page_bytes


def _common_prefix_bytes(packed: bytes, start: int, end: int, key: bytes) -> int:
    """Length in bytes of the common prefix of ``packed[start:end]`` and ``key``.

    Binary search with ``memcmp``-backed comparisons; the compared slices halve each step, so the
    total work is linear and no Python code runs per byte.
    """
    hi = min(end - start, len(key))
    if packed.startswith(key[:hi], start):
        return hi
    lo = 0  # the inputs agree on [0, lo) and differ somewhere in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if packed.startswith(key[lo:mid], start + lo):
            lo = mid
        else:
            hi = mid
    return lo


def _check_slot_partition(
    allocator: Any,
    tree_slots: list[np.ndarray],
    live_slots: list[np.ndarray | torch.Tensor],
) -> None:
    """Every usable slot appears exactly once among free, tree and live slots."""
    first, capacity = allocator.first_slot, allocator.capacity_tokens
    groups = {"free": [allocator.free_slots()], "tree": tree_slots, "live": live_slots}
    counts = np.zeros(capacity, dtype=np.int64)
    for name, arrays in groups.items():
        if not arrays:
            continue
        slots = concat_slots([as_slot_array(a) for a in arrays]) - first
        outside = slots[(slots < 0) | (slots >= capacity)]
        assert outside.size == 0, (
            f"{name} slots outside the usable range: {(outside + first)[:8].tolist()}"
        )
        counts += np.bincount(slots, minlength=capacity)
    twice = np.flatnonzero(counts > 1)
    assert twice.size == 0, f"slots in more than one place: {(twice + first)[:8].tolist()}"
    missing = np.flatnonzero(counts == 0)
    assert missing.size == 0, (
        f"leaked slots (not free, not live, not cached): {(missing + first)[:8].tolist()}"
    )
