"""Groups of decode sequences that share a leading run of KV slots (for cascade attention).

With the radix cache, requests that share a prompt prefix share its KV slots: every such
sequence's slot list starts with the same slots. A cascade decode reads those slots once per
group instead of once per sequence. This module finds the groups on the host, from the slot
lists the executor already has, in a few vectorized numpy passes (no per-sequence Python loop
over slots), and ships the result to the device in one copy.

It sits beside ``batch.py`` rather than under ``model/`` because ``ForwardBatch.build`` fills it
in, and the data contracts never import the layers above them.

Precondition (the KV pool's ownership invariant): a slot is held by one radix-tree node or one
request, so two sequences that hold the same slot at the same position reached it through the
same tree path and hold the same slots everywhere before it. The finder relies on it twice: it
groups by the slot at position ``min_shared - 1`` alone, and it finds each member's common
prefix with its group's first member by binary search over positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radixlm.slots import as_slot_array, concat_slots
from radixlm.transfer import to_device

DEFAULT_MIN_SHARED = 256


@dataclass
class PrefixGroups:
    """Decode sequences grouped by a shared leading run of slots.

    Every member of group ``g`` holds the same first ``shared_lens[g]`` slots, and holds at least
    one slot of its own after them (its query token's), so its own part is never empty.

    Attributes:
        group_indptr: [G+1] int32 (device) offsets of each group's members in ``group_rows``.
        group_rows: [M] int32 (device) batch rows of the members, group by group, ascending
            within a group; the first member of a group is its leader, whose slot list the
            prefix kernel reads the shared slots from.
        shared_lens: [G] int32 (device) shared prefix length of each group, >= ``min_shared``.
        suffix_start: [B] int32 (device) per batch row, where its own slots start: the shared
            length of its group, 0 for a sequence in no group.
        group_sizes_cpu / shared_lens_cpu: host copies of the group sizes and shared lengths.
    """

    group_indptr: torch.Tensor
    group_rows: torch.Tensor
    shared_lens: torch.Tensor
    suffix_start: torch.Tensor
    group_sizes_cpu: list[int]
    shared_lens_cpu: list[int]

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes_cpu)

    @property
    def max_group_size(self) -> int:
        return max(self.group_sizes_cpu, default=0)

    def __len__(self) -> int:
        return self.num_groups


def find_prefix_groups(
    seq_slots: Sequence[Sequence[int] | torch.Tensor],
    min_shared: int = DEFAULT_MIN_SHARED,
    device: torch.device | str = "cpu",
) -> PrefixGroups | None:
    """Group decode sequences by their shared leading slots.

    Args:
        seq_slots: per sequence, the pool slots of all its tokens (the query token's last), as
            lists or int64 CPU tensors.
        min_shared: fewest shared slots for a group to count (>= 1).
        device: where the group tensors go.

    Returns:
        The groups, or None when no two sequences share ``min_shared`` leading slots.
    """
    parts = [as_slot_array(s) for s in seq_slots]
    return find_prefix_groups_flat(concat_slots(parts), [len(p) for p in parts], min_shared,
                                   device)


def find_prefix_groups_flat(
    flat_slots: np.ndarray | torch.Tensor,
    seq_lens: Sequence[int],
    min_shared: int = DEFAULT_MIN_SHARED,
    device: torch.device | str = "cpu",
) -> PrefixGroups | None:
    """Like :func:`find_prefix_groups`, on the slot lists already concatenated (CSR).

    Args:
        flat_slots: every sequence's slots, one after the other (int64, on the host; a device
            tensor is copied back, which waits for the device).
        seq_lens: each sequence's slot count.
        min_shared: fewest shared slots for a group to count (>= 1).
        device: where the group tensors go.

    Returns:
        The groups, or None when no two sequences share ``min_shared`` leading slots.

    Raises:
        ValueError: ``min_shared`` < 1.
    """
    if min_shared < 1:
        raise ValueError(f"min_shared must be >= 1, got {min_shared}")
    flat = as_slot_array(flat_slots)
    lens = np.asarray(seq_lens, dtype=np.int64)
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    # A member needs min_shared shared slots and at least its own query slot after them.
    rows = np.flatnonzero(lens > min_shared)
    if len(rows) < 2:
        return None
    members, run_starts = _runs_of_equal_keys(flat[starts[rows] + min_shared - 1], rows)
    if len(members) == 0:
        return None
    sizes = np.diff(np.append(run_starts, len(members)))
    leaders = np.repeat(members[run_starts], sizes)
    common = _common_prefix_lens(flat, starts, lens, members, leaders, min_shared)
    shared = np.minimum.reduceat(common, run_starts)
    return _to_device(members, sizes, shared, len(lens), device)


def _runs_of_equal_keys(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted into runs of equal keys, runs of one dropped; returns (rows, run starts)."""
    # Stable: rows stay ascending inside a run, so a run's first row is its smallest.
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], rows[order]
    new_run = np.ones(len(keys), dtype=bool)
    new_run[1:] = keys[1:] != keys[:-1]
    starts = np.flatnonzero(new_run)
    sizes = np.diff(np.append(starts, len(keys)))
    keep = np.repeat(sizes >= 2, sizes)
    kept_sizes = sizes[sizes >= 2]
    kept_starts = np.zeros(len(kept_sizes), dtype=np.int64)
    np.cumsum(kept_sizes[:-1], out=kept_starts[1:])
    return rows[keep], kept_starts


def _common_prefix_lens(
    flat: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    members: np.ndarray,
    leaders: np.ndarray,
    known: int,
) -> np.ndarray:
    """Leading slots each member shares with its leader, at most min(lengths) - 1.

    Binary search over lengths for all members at once: matching at position p implies
    matching before it (the module's precondition), and the first ``known`` slots match.
    (Probing many positions per round in one 2-D gather was measured slower: the rounds are
    bound by numpy's per-call overhead, not by the 512-element gathers.)
    """
    lo = np.full(len(members), known, dtype=np.int64)  # longest prefix known to match
    hi = np.minimum(lens[members], lens[leaders]) - 1  # longest it may be: both keep a slot
    mine, theirs = starts[members] - 1, starts[leaders] - 1
    while (lo < hi).any():
        # Settled rows probe mid == lo, a known match, so they need no mask.
        mid = (lo + hi + 1) >> 1
        same = flat[mine + mid] == flat[theirs + mid]
        lo = np.where(same, mid, lo)
        hi = np.where(same, hi, mid - 1)
    return lo


def _to_device(
    members: np.ndarray, sizes: np.ndarray, shared: np.ndarray, batch: int, device
) -> PrefixGroups:
    """Pack every array into one int32 buffer: one pinned, non-blocking host-to-device copy."""
    num_groups, num_members = len(sizes), len(members)
    indptr = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    suffix_start = np.zeros(batch, dtype=np.int64)
    suffix_start[members] = np.repeat(shared, sizes)
    packed = np.concatenate([indptr, members, shared, suffix_start]).astype(np.int32)
    buf = to_device(torch.from_numpy(packed), torch.device(device))
    cuts = np.cumsum([num_groups + 1, num_members, num_groups])
    return PrefixGroups(
        group_indptr=buf[: cuts[0]],
        group_rows=buf[cuts[0] : cuts[1]],
        shared_lens=buf[cuts[1] : cuts[2]],
        suffix_start=buf[cuts[2] :],
        group_sizes_cpu=sizes.tolist(),
        shared_lens_cpu=shared.tolist(),
    )
