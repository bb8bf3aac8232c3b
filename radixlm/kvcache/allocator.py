"""Page-granular slot allocator over the usable part of the KV pool.

The free list is a tensor used as a stack of page ids, so ``alloc`` and ``free`` cost a handful of
torch ops whatever the number of pages involved (no per-slot Python loop). A per-page "is free"
mask catches double frees, which are always bugs in the caller.
"""

from __future__ import annotations

import torch

_INT64 = torch.int64


class PageAllocator:
    """Hands out whole pages of ``page_size`` consecutive KV slots.

    Usable slots are ``[first_slot, first_slot + num_pages * page_size)``; page ``p`` covers slots
    ``first_slot + p * page_size + [0, page_size)``. Slots are CPU int64 tensors.

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
        self._page_offsets = torch.arange(page_size, dtype=_INT64)
        self._stack = torch.empty(num_pages, dtype=_INT64)
        self._page_is_free = torch.empty(num_pages, dtype=torch.bool)
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
        torch.arange(self.num_pages - 1, -1, -1, dtype=_INT64, out=self._stack)
        self._page_is_free.fill_(True)
        self._num_free = self.num_pages

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Take ``num_tokens // page_size`` whole pages.

        Args:
            num_tokens: slots wanted; a multiple of ``page_size``.

        Returns:
            The slots (int64, page after page, each page's slots in order), or None when fewer
            than ``num_tokens`` slots are free (nothing is taken then).

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
        pages = self._stack[top - num_pages : top].flip(0)
        self._num_free = top - num_pages
        self._page_is_free[pages] = False
        return self._pages_to_slots(pages)

    def free(self, slots: torch.Tensor) -> None:
        """Return whole pages to the free list.

        Args:
            slots: every slot of each page being freed (any order, any device).

        Raises:
            ValueError: a slot outside the usable range, a partial page, a slot listed twice,
                or a page that is already free (a double free).
        """
        pages = self._slots_to_pages(slots)
        if pages.numel() == 0:
            return
        already_free = self._page_is_free[pages]
        if bool(already_free.any()):
            bad = self._pages_to_slots(pages[already_free][:4]).tolist()
            raise ValueError(f"double free: slots {bad}... are already free")
        if torch.unique(pages).numel() != pages.numel():
            raise ValueError("free(): the same page is listed more than once")
        top = self._num_free
        self._stack[top : top + pages.numel()] = pages
        self._num_free = top + pages.numel()
        self._page_is_free[pages] = True

    def free_slots(self) -> torch.Tensor:
        """All free slots (int64, unordered)."""
        return self._pages_to_slots(self._stack[: self._num_free])

    def free_slot_set(self) -> set[int]:
        """All free slots as a Python set (for invariant checks and tests)."""
        return set(self.free_slots().tolist())

    def check_invariants(self) -> None:
        """Assert that the free stack and the free mask agree and hold no duplicate page."""
        stack = self._stack[: self._num_free]
        assert torch.unique(stack).numel() == stack.numel(), "free list holds a page twice"
        assert int(self._page_is_free.sum()) == self._num_free, (
            f"free mask counts {int(self._page_is_free.sum())} pages, stack {self._num_free}"
        )
        assert bool(self._page_is_free[stack].all()), "a page on the free list is marked used"

    def _pages_to_slots(self, pages: torch.Tensor) -> torch.Tensor:
        if self.page_size == 1:
            return pages + self.first_slot
        slots = pages.unsqueeze(1) * self.page_size + self._page_offsets
        return slots.reshape(-1) + self.first_slot

    def _slots_to_pages(self, slots: torch.Tensor) -> torch.Tensor:
        """Page ids of whole pages given as slots; validates range and completeness."""
        rel = slots.reshape(-1).to(device="cpu", dtype=_INT64) - self.first_slot
        if rel.numel() % self.page_size:
            raise ValueError(f"free(): {rel.numel()} slots is not whole pages of {self.page_size}")
        if rel.numel() and (int(rel.min()) < 0 or int(rel.max()) >= self.capacity_tokens):
            raise ValueError(
                f"free(): slots outside [{self.first_slot}, "
                f"{self.first_slot + self.capacity_tokens})"
            )
        if self.page_size == 1:
            return rel
        pages = self._whole_pages(rel.view(-1, self.page_size))
        if pages is None:  # not page after page in order: accept any order of whole pages
            pages = self._whole_pages(rel.sort().values.view(-1, self.page_size))
        if pages is None:
            raise ValueError("free(): slots do not form whole pages")
        return pages

    def _whole_pages(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Page ids if every row is one page's slots in order, else None."""
        pages = rows[:, 0] // self.page_size
        expected = pages.unsqueeze(1) * self.page_size + self._page_offsets
        return pages if torch.equal(rows, expected) else None
