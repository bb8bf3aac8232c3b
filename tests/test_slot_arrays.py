"""Host slot arrays: one dtype and shape whatever comes in; concatenation never aliases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radixlm.slots import EMPTY_SLOTS, SLOT_DTYPE, as_slot_array, concat_slots


@pytest.mark.parametrize("given", [[3, 1, 2], (3, 1, 2), np.array([3, 1, 2], dtype=np.int32),
                                   torch.tensor([3, 1, 2]), torch.tensor([[3, 1, 2]])])
def test_as_slot_array_gives_flat_int64(given):
    out = as_slot_array(given)
    assert out.dtype == SLOT_DTYPE and out.ndim == 1 and out.tolist() == [3, 1, 2]


def test_int64_arrays_and_cpu_tensors_are_not_copied():
    array = np.array([5, 6], dtype=np.int64)
    assert as_slot_array(array) is array
    tensor = torch.tensor([7, 8])
    as_slot_array(tensor)[0] = 9  # shares the tensor's memory
    assert tensor.tolist() == [9, 8]


def test_concat_never_returns_a_view_of_a_part():
    part = np.array([1, 2], dtype=np.int64)
    joined = concat_slots([part])
    joined[0] = 100
    assert part.tolist() == [1, 2]
    assert concat_slots([]).size == 0 and concat_slots([]).dtype == SLOT_DTYPE


def test_the_shared_empty_array_is_read_only():
    with pytest.raises(ValueError):
        EMPTY_SLOTS.resize(1)
    assert not EMPTY_SLOTS.flags.writeable
