"""Queue orderings: which waiting requests get admitted first."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

from radixlm.request import Request

# Matching every waiting request against the tree costs O(queue x prompt); past this queue
# length lpm falls back to fcfs, as a cache-aware order stops paying for itself.
LPM_MAX_QUEUE = 256


def order_fcfs(waiting: list[Request], prefix_len: Callable[[Request], int]) -> list[Request]:
    return sorted(waiting, key=lambda r: r.arrival)


def order_lpm(waiting: list[Request], prefix_len: Callable[[Request], int]) -> list[Request]:
    """Longest cached prefix first; ties by arrival."""
    if len(waiting) > LPM_MAX_QUEUE:
        return order_fcfs(waiting, prefix_len)
    return sorted(waiting, key=lambda r: (-prefix_len(r), r.arrival))


def order_dfs_weight(waiting: list[Request], prefix_len: Callable[[Request], int]) -> list[Request]:
    """Depth-first over the trie of waiting sequences, heavier subtrees first.

    Requests that share a prefix (siblings of a fork, a batch over one system prompt) end up
    adjacent, so they run together while their shared prefix is hot in the cache.
    """
    ordered: list[Request] = []
    entries = [(r.seq, r) for r in sorted(waiting, key=lambda r: r.arrival)]
    _dfs(entries, 0, ordered)
    if len(ordered) > LPM_MAX_QUEUE:
        return ordered
    # Subtrees whose prefix is already cached go first; the sort is stable, so siblings stay
    # adjacent in depth-first order.
    return sorted(ordered, key=lambda r: -prefix_len(r))


def _dfs(group: list[tuple[list[int], Request]], depth: int, out: list[Request]) -> None:
    if len(group) == 1:
        out.append(group[0][1])
        return
    # Jump over the prefix the whole group shares instead of walking it token by token.
    depth = max(depth, len(os.path.commonprefix([seq for seq, _ in group])))
    buckets: dict[int, list[tuple[list[int], Request]]] = {}
    for seq, req in group:
        if len(seq) <= depth:
            out.append(req)
        else:
            buckets.setdefault(seq[depth], []).append((seq, req))
    for bucket in sorted(buckets.values(), key=lambda b: (-len(b), b[0][1].arrival)):
        _dfs(bucket, depth + 1, out)


def make_random_order(seed: int) -> Callable:
    rng = random.Random(seed)

    def order_random(waiting: list[Request], prefix_len: Callable[[Request], int]) -> list[Request]:
        shuffled = list(waiting)
        rng.shuffle(shuffled)
        return shuffled

    return order_random


def make_policy(name: str, seed: int = 0) -> Callable:
    """The ordering function for a policy name.

    Raises:
        ValueError: unknown policy.
    """
    policies = {"fcfs": order_fcfs, "lpm": order_lpm, "dfs-weight": order_dfs_weight}
    if name == "random":
        return make_random_order(seed)
    if name not in policies:
        raise ValueError(f"unknown schedule_policy {name!r}; choose from {sorted(policies)}")
    return policies[name]
