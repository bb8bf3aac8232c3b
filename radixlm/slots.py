"""KV slot indices on the host: 1-D int64 numpy arrays.

The scheduler touches every running request's slots every decode step (allocate one slot, append
it, hand the sequence's slots to the batch), so the per-operation cost of the array type is the
host's per-request cost. An operation on a tiny numpy array costs a fraction of a microsecond,
one on a tiny CPU torch tensor 1-3 µs, so the allocator, the radix tree, requests and scheduled
rows all keep slots as numpy arrays; ``ForwardBatch.build`` concatenates a batch's slots once
and hands the result to torch without a copy (``torch.from_numpy``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SLOT_DTYPE = np.int64

# Shared by everything that holds no slots. Read-only, so nothing can append into it in place.
EMPTY_SLOTS = np.zeros(0, dtype=SLOT_DTYPE)
EMPTY_SLOTS.setflags(write=False)


def as_slot_array(slots: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    """``slots`` as a 1-D int64 numpy array; an int64 array is returned as is (no copy).

    Torch tensors are accepted (a CPU tensor shares its memory; a device tensor is copied back,
    which waits for the device), as are lists of ints.
    """
    if isinstance(slots, np.ndarray) and slots.dtype == SLOT_DTYPE and slots.ndim == 1:
        return slots
    if isinstance(slots, torch.Tensor):
        slots = slots.detach().cpu().numpy()
    return np.asarray(slots, dtype=SLOT_DTYPE).reshape(-1)


def concat_slots(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The parts one after the other, always in a new array (never a view of a part)."""
    if not parts:
        return np.zeros(0, dtype=SLOT_DTYPE)
    return np.concatenate(parts)
