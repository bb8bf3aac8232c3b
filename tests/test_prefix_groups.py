"""The prefix-group finder against a brute-force oracle, and its place in ForwardBatch.build.

Slot lists are generated the way the radix cache produces them: a sequence either starts fresh
or reuses the first ``cut`` slots of an earlier sequence (a path down the tree), then gets slots
of its own, never used by anyone else (its query token's slot is always its own).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixlm.batch import ForwardBatch, ForwardMode
from radixlm.prefix_groups import find_prefix_groups, find_prefix_groups_flat


@st.composite
def tree_slot_lists(draw) -> list[list[int]]:
    """Slot lists that share prefixes as radix-cache paths do; slot numbers shuffled."""
    count = draw(st.integers(1, 14))
    fresh = iter(draw(st.permutations(range(1, 14 * 45 + 1))))
    seqs: list[list[int]] = []
    for _ in range(count):
        base: list[int] = []
        if seqs and draw(st.booleans()):
            parent = draw(st.sampled_from(seqs))
            # Never the parent's query slot: a decode row's last slot is its own.
            base = parent[: draw(st.integers(0, len(parent) - 1))]
        own = draw(st.integers(1, 20))
        seqs.append(base + [next(fresh) for _ in range(own)])
    return seqs


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def oracle_groups(seqs: list[list[int]], min_shared: int) -> set[tuple[tuple[int, ...], int]]:
    """Classes of 'share >= min_shared slots, each keeping one of its own', and their prefix."""

    def linked(i: int, j: int) -> bool:
        cap = min(len(seqs[i]), len(seqs[j])) - 1
        return min(common_prefix(seqs[i], seqs[j]), cap) >= min_shared

    unseen, found = set(range(len(seqs))), set()
    while unseen:
        i = min(unseen)
        members = tuple(j for j in range(len(seqs)) if j == i or linked(i, j))
        unseen -= set(members)
        if len(members) < 2:
            continue
        shared = min(len(seqs[j]) - 1 for j in members)
        for j in members:
            shared = min(shared, common_prefix(seqs[i], seqs[j]))
        found.add((members, shared))
    return found


def groups_as_set(groups) -> set[tuple[tuple[int, ...], int]]:
    if groups is None:
        return set()
    indptr, rows = groups.group_indptr.tolist(), groups.group_rows.tolist()
    return {
        (tuple(rows[indptr[g] : indptr[g + 1]]), groups.shared_lens_cpu[g])
        for g in range(groups.num_groups)
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=tree_slot_lists(), min_shared=st.integers(1, 12), as_tensors=st.booleans())
def test_groups_match_the_brute_force_oracle(seqs, min_shared, as_tensors):
    given_slots = [torch.tensor(s, dtype=torch.int64) for s in seqs] if as_tensors else seqs
    groups = find_prefix_groups(given_slots, min_shared)
    want = oracle_groups(seqs, min_shared)
    assert groups_as_set(groups) == want
    if groups is None:
        return
    # The device tensors agree with the host lists and with each other.
    assert groups.group_sizes_cpu == groups.group_indptr.diff().tolist()
    assert groups.shared_lens.tolist() == groups.shared_lens_cpu
    suffix_start = [0] * len(seqs)
    for members, shared in want:
        for row in members:
            suffix_start[row] = shared
    assert groups.suffix_start.tolist() == suffix_start
    assert all(s >= min_shared for s in groups.shared_lens_cpu)
    assert all(groups.group_indptr.diff() >= 2)


def test_a_group_whose_members_own_only_their_query_slot():
    shared = list(range(100, 140))
    seqs = [shared + [7], shared + [8], shared + [9], list(range(200, 260))]
    groups = find_prefix_groups(seqs, min_shared=32)
    assert groups_as_set(groups) == {((0, 1, 2), 40)}
    assert groups.suffix_start.tolist() == [40, 40, 40, 0]


def test_a_shared_prefix_shorter_than_min_shared_is_no_group():
    shared = list(range(100, 120))
    seqs = [shared + [1, 2], shared + [3], [5, 6, 7]]
    assert find_prefix_groups(seqs, min_shared=21) is None
    assert groups_as_set(find_prefix_groups(seqs, min_shared=20)) == {((0, 1), 20)}


def test_members_are_grouped_at_the_min_shared_depth_with_their_common_prefix():
    # Rows 0 and 1 share 30 slots, all three share 12: one group at depth 8, shared 12.
    trunk, branch = list(range(100, 112)), list(range(200, 218))
    seqs = [trunk + branch + [1], trunk + branch + [2, 3], trunk + [4, 5]]
    assert groups_as_set(find_prefix_groups(seqs, min_shared=8)) == {((0, 1, 2), 12)}
    assert groups_as_set(find_prefix_groups(seqs, min_shared=13)) == {((0, 1), 30)}


def test_no_sequences_and_a_bad_threshold():
    assert find_prefix_groups([], min_shared=4) is None
    assert find_prefix_groups([[1, 2, 3, 4, 5]], min_shared=2) is None
    with pytest.raises(ValueError):
        find_prefix_groups_flat(torch.arange(4), [2, 2], min_shared=0)


def test_forward_batch_finds_groups_for_decode_only_when_asked():
    shared = list(range(100, 120))
    slots = [shared + [1], shared + [2, 3], [50, 51]]
    decode = ForwardBatch.build([[5], [6], [7]], slots, prefix_min_shared=16)
    assert decode.mode is ForwardMode.DECODE
    assert groups_as_set(decode.prefix_groups) == {((0, 1), 20)}
    assert ForwardBatch.build([[5], [6], [7]], slots).prefix_groups is None
    extend = ForwardBatch.build([[5], [6, 7], [8]], slots, prefix_min_shared=16)
    assert extend.mode is ForwardMode.EXTEND and extend.prefix_groups is None
