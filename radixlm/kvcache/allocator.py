"""Page-granular slot allocator over the usable part of the KV pool.

The free list is an array used as a stack of page ids, so ``alloc`` and ``free`` cost a handful of
vectorized ops whatever the number of pages involved (no per-slot Python loop). The bookkeeping
arrays are numpy rather than torch because each call is a few small ops and numpy's per-op
overhead is several times lower on CPU; slots cross the API as int64 numpy arrays too (see
:mod:`radixlm.slots`). A per-page free flag catches double frees, which are always bugs in the
caller.
"""

from __future__ import annotations

import numpy as np
import torch

from radixlm.slots import as_slot_array


class PageAllocator:
    """Hands out whole pages of ``page_size`` consecutive KV slots.

    Usable slots are ``[first_slot, first_slot + num_pages * page_size)``; page ``p`` covers slots
    ``first_slot + p * page_size + [0, page_size)``. Slots are int64 numpy arrays.

    Args:
        num_pages: pages under management.
        page_size: slots per page.
        first_slot: the first usable slot (the pool reserves page 0 as scratch).
    """

    def __init__(self, num_pages: int, page_size: int, first_slot: int):
        if num_pages < 1 or page_size < 1 or first_slot < 0:
            raise ValueError(
                f"need num_pages >= 1, page_size >= 1, first_slot >= 0; "
                f"got {num_pages}, {page_size}, {first_slot}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self.first_slot = first_slot
        self._page_offsets = np.arange(page_size, dtype=np.int64)
        self._stack = np.empty(num_pages, dtype=np.int64)
        self._page_is_free = np.empty(num_pages, dtype=np.bool_)
        # Scratch for spotting a page listed twice in one free() (see _check_distinct).
        self._stamp = np.zeros(num_pages, dtype=np.int64)
        self._num_free = 0
        self.reset()

    @property
    def free_tokens(self) -> int:
        """Slots currently free."""
        return self._num_free * self.page_size

    @property
    def capacity_tokens(self) -> int:
        """All usable slots."""
        return self.num_pages * self.page_size

    def reset(self) -> None:
        """Mark every page free (forgets all outstanding allocations)."""
        # Reversed so that the first allocations get the lowest pages.
        self._stack[:] = np.arange(self.num_pages - 1, -1, -1, dtype=np.int64)
        self._page_is_free[:] = True
        self._num_free = self.num_pages

    def alloc(self, num_tokens: int) -> np.ndarray | None:
        """Take ``num_tokens // page_size`` whole pages.

        Args:
            num_tokens: slots wanted; a multiple of ``page_size``.

        Returns:
            The slots (a new int64 array, page after page, each page's slots in order), or None
            when fewer than ``num_tokens`` slots are free (nothing is taken then).

        Raises:
            ValueError: ``num_tokens`` is negative or not a multiple of ``page_size``.
        """
        if num_tokens < 0 or num_tokens % self.page_size:
            raise ValueError(
                f"alloc({num_tokens}): need a non-negative multiple of page_size={self.page_size}"
            )
        num_pages = num_tokens // self.page_size
        if num_pages > self._num_free:
            return None
        top = self._num_free
        pages = self._stack[top - num_pages : top][::-1]
        self._num_free = top - num_pages
        self._page_is_free[pages] = False
        return self._pages_to_slots(pages)

    def free(self, slots: np.ndarray | torch.Tensor) -> None:
        """Return whole pages to the free list.

        Args:
            slots: every slot of each page being freed (any order; a numpy array, or a torch
                tensor on any device).

        Raises:
            ValueError: a slot outside the usable range, a partial page, a page listed twice,
                or a page that is already free (a double free). Nothing is freed then.
        """
        pages = self._slots_to_pages(slots)
        if pages.size == 0:
            return
        already_free = self._page_is_free[pages]
        if already_free.any():
            bad = self._pages_to_slots(pages[already_free][:4]).tolist()
            raise ValueError(f"double free: slots {bad}... are already free")
        self._check_distinct(pages)
        top = self._num_free
        self._stack[top : top + pages.size] = pages
        self._num_free = top + pages.size
        self._page_is_free[pages] = True

    def free_slots(self) -> np.ndarray:
        """All free slots (a new int64 array, unordered)."""
        return self._pages_to_slots(self._stack[: self._num_free])

    def free_slot_set(self) -> set[int]:
        """All free slots as a Python set (for invariant checks and tests)."""
        return set(self.free_slots().tolist())

    def check_invariants(self) -> None:
        """Assert that the free stack and the free flags agree and hold no duplicate page."""
        stack = self._stack[: self._num_free]
        assert np.unique(stack).size == stack.size, "free list holds a page twice"
        flagged = int(self._page_is_free.sum())
        assert flagged == self._num_free, f"{flagged} pages flagged free, {self._num_free} stacked"
        assert self._page_is_free[stack].all(), "a page on the free list is flagged in use"

    def _pages_to_slots(self, pages: np.ndarray) -> np.ndarray:
        if self.page_size == 1:
            return pages + self.first_slot
        slots = pages[:, None] * self.page_size + self._page_offsets
        return slots.reshape(-1) + self.first_slot

    def _slots_to_pages(self, slots: np.ndarray | torch.Tensor) -> np.ndarray:
        """Page ids of whole pages given as slots; validates range and completeness."""
        rel = as_slot_array(slots) - self.first_slot  # a new array: the caller's is never written
        if rel.size % self.page_size:
            raise ValueError(f"free(): {rel.size} slots is not whole pages of {self.page_size}")
        if rel.size and (rel.min() < 0 or rel.max() >= self.capacity_tokens):
            raise ValueError(
                f"free(): slots outside [{self.first_slot}, "
                f"{self.first_slot + self.capacity_tokens})"
            )
        if self.page_size == 1:
            return rel
        pages = self._whole_pages(rel.reshape(-1, self.page_size))
        if pages is None:  # not page after page in order: accept any order of whole pages
            pages = self._whole_pages(np.sort(rel).reshape(-1, self.page_size))
        if pages is None:
            raise ValueError("free(): slots do not form whole pages")
        return pages

    def _whole_pages(self, rows: np.ndarray) -> np.ndarray | None:
        """Page ids if every row is one page's slots in order, else None."""
        pages = rows[:, 0] // self.page_size
        expected = pages[:, None] * self.page_size + self._page_offsets
        return pages if np.array_equal(rows, expected) else None

    def _check_distinct(self, pages: np.ndarray) -> None:
        """Raise if a page appears twice: writing each position into its page's stamp, a
        repeated page keeps only its last position, so an earlier one reads back different."""
        positions = np.arange(pages.size, dtype=np.int64)
        self._stamp[pages] = positions
        if not np.array_equal(self._stamp[pages], positions):
            raise ValueError("free(): the same page is listed more than once")
