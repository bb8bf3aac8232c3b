"""Per-request KV bookkeeping on top of the page allocator and the radix tree.

The allocator hands out whole pages; a request fills its last page token by token, keeping the
unused rest as ``spare_slots``. Only page-aligned prefixes enter the radix tree, so the unaligned
tail of a sequence always stays with the request (and is freed with it).

Slots are int64 numpy arrays (:mod:`radixlm.slots`); a decode step's allocation costs one
allocator call for the whole batch and a few cheap scalar operations per request.
"""

from __future__ import annotations

import numpy as np

from radixlm.kvcache.allocator import PageAllocator
from radixlm.kvcache.radix_tree import RadixCache
from radixlm.request import Request
from radixlm.slots import EMPTY_SLOTS, concat_slots


class KVManager:
    """Matches, allocates, caches and frees the KV slots of requests.

    Args:
        allocator: the page allocator over the pool's usable slots.
        tree: the radix cache (its ``free_fn`` must be ``allocator.free``).
        enable_radix_cache: when False, nothing is matched or inserted; slots are freed.
    """

    def __init__(self, allocator: PageAllocator, tree: RadixCache, enable_radix_cache: bool):
        self.allocator = allocator
        self.tree = tree
        self.enabled = enable_radix_cache
        self.page_size = allocator.page_size

    # ---- capacity -------------------------------------------------------------------------

    def available_tokens(self) -> int:
        """Tokens obtainable now: free slots plus unlocked cache that can be evicted."""
        return self.allocator.free_tokens + self.tree.evictable_tokens()

    def pages_for(self, req: Request, num_new: int) -> int:
        """Tokens (whole pages) to allocate so ``req`` can grow by ``num_new`` tokens."""
        missing = num_new - len(req.spare_slots)
        if missing <= 0:
            return 0
        return -(-missing // self.page_size) * self.page_size

    # ---- prefix matching ------------------------------------------------------------------

    def match(self, req: Request) -> int:
        """Give ``req`` its longest cached prefix (locked). Returns the prefix length."""
        if not self.enabled:
            self._set_tree_prefix(req, EMPTY_SLOTS, None)
            return 0
        limit = req.match_limit()
        result = self.tree.match_prefix(req.seq[:limit], namespace=req.namespace)
        self.tree.lock(result.node)
        self._set_tree_prefix(req, result.slots, result.node)
        return result.length

    def peek_prefix_len(self, req: Request) -> int:
        """Cached prefix length without locking (for ordering the queue)."""
        if not self.enabled:
            return 0
        return self.tree.match_prefix(req.seq[: req.match_limit()], namespace=req.namespace).length

    def _set_tree_prefix(self, req: Request, slots: np.ndarray, node) -> None:
        req.kv_slots = slots
        req.spare_slots = EMPTY_SLOTS
        req.num_computed = len(slots)
        req.tree_len = len(slots)
        req.tree_node = node

    # ---- allocation -----------------------------------------------------------------------

    def allocate(self, req: Request, num_new: int) -> np.ndarray | None:
        """Slots for the next ``num_new`` tokens of ``req``, evicting cache if needed.

        Returns:
            The new tokens' slots (also appended to ``req.kv_slots``), or None when the pool
            cannot provide them even after eviction (nothing changes then).
        """
        need = self.pages_for(req, num_new)
        if need:
            if not self.reserve(need):
                return None
            fresh = self.allocator.alloc(need)
            if fresh is None:
                return None
            req.spare_slots = concat_slots([req.spare_slots, fresh])
        slots, req.spare_slots = req.spare_slots[:num_new], req.spare_slots[num_new:]
        req.append_slots(slots)
        return slots

    def allocate_decode(self, reqs: list[Request]) -> bool:
        """One slot for each request, pages for all of them fetched in one allocator call.

        Returns:
            False (nothing changed) when the pool cannot provide them even after eviction.
        """
        needy = [r for r in reqs if not len(r.spare_slots)]
        if needy:
            need = len(needy) * self.page_size
            fresh = self.allocator.alloc(need) if self.reserve(need) else None
            if fresh is None:
                return False
            # One row per needy request: iterating a 2-D array yields its rows as views.
            for req, page in zip(needy, fresh.reshape(len(needy), self.page_size)):
                req.spare_slots = page
        for req in reqs:
            spare = req.spare_slots
            req.append_slot(spare[0])
            req.spare_slots = spare[1:]
        return True

    def reserve(self, num_tokens: int) -> bool:
        """Evict unlocked cache until ``num_tokens`` slots are free. False if impossible."""
        short = num_tokens - self.allocator.free_tokens
        if short > 0 and self.enabled:
            self.tree.evict(short)
        return self.allocator.free_tokens >= num_tokens

    # ---- caching and release --------------------------------------------------------------

    def cache_partial(self, req: Request) -> None:
        """Insert the computed prefix of an unfinished request and re-lock on the tree's copy."""
        if not self.enabled:
            return
        aligned = self._insert_computed(req)
        result = self.tree.match_prefix(req.seq[:aligned], namespace=req.namespace)
        self.tree.lock(result.node)
        self.tree.unlock(req.tree_node)
        req.kv_slots = concat_slots([result.slots, req.kv_slots[result.length :]])
        req.tree_len = result.length
        req.tree_node = result.node

    def release(self, req: Request) -> None:
        """Put what ``req`` computed into the cache and free every slot it still owns.

        Used when a request finishes and when it is retracted (it re-matches later).
        """
        if self.enabled and req.tree_node is not None:
            aligned = self._insert_computed(req)
            self.tree.unlock(req.tree_node)
        else:
            aligned = req.tree_len
        # The unaligned tail and the spare rest of its page make whole pages together.
        self._free(concat_slots([req.kv_slots[aligned:], req.spare_slots]))
        self._set_tree_prefix(req, EMPTY_SLOTS, None)
        req.num_computed = 0

    def _insert_computed(self, req: Request) -> int:
        """Insert the page-aligned computed prefix; free duplicates. Returns the aligned length."""
        aligned = req.num_computed - req.num_computed % self.page_size
        if aligned <= req.tree_len:
            return req.tree_len
        present = self.tree.insert(
            req.seq[:aligned], req.kv_slots[:aligned], namespace=req.namespace
        )
        # Another request inserted some of these tokens meanwhile: ours are duplicates.
        self._free(req.kv_slots[req.tree_len : max(present, req.tree_len)])
        return aligned

    def _free(self, slots: np.ndarray) -> None:
        if len(slots):
            self.allocator.free(slots)

    def flush(self) -> None:
        """Drop the whole radix cache (only valid when no request holds a lock)."""
        self.tree.reset()

    def live_slots(self, reqs: list[Request]) -> list[np.ndarray]:
        """Slots owned by live requests (for invariant checks).

        That is everything past the tree prefix, including slots of tokens a launched step is
        still computing (beyond ``num_computed`` while a step is in flight), plus the spares.
        """
        out = []
        for req in reqs:
            out.append(req.kv_slots[req.tree_len :])
            out.append(req.spare_slots)
        return out
