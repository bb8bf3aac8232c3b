"""summarize_tree against a brute-force walk of the same tree: sizes, bounds, ancestry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.kvcache import PageAllocator, RadixCache
from radixlm.kvcache.tree_summary import LABEL_TOKENS, summarize_tree


def build(seqs: list[tuple[list[int], str | None]], locked: int = 0) -> RadixCache:
    alloc = PageAllocator(20_000, 1, first_slot=1)
    cache = RadixCache(1, free_fn=alloc.free)
    for tokens, namespace in seqs:
        slots = alloc.alloc(len(tokens))
        present = cache.insert(tokens, slots, namespace=namespace)
        alloc.free(slots[:present])
    for tokens, namespace in seqs[:locked]:
        cache.lock(cache.match_prefix(tokens, namespace=namespace).node)
    return cache


def brute_force(cache: RadixCache) -> dict[int, tuple[int, int, list[int], int | None]]:
    """id -> (edge tokens, subtree tokens, edge token ids, parent id) for every node."""
    out: dict[int, tuple[int, int, list[int], int | None]] = {}

    def walk(node, parent_id):
        total = node.num_tokens + sum(walk(c, id(node)) for c in node.children.values())
        out[id(node)] = (node.num_tokens, total, node.token_ids(), parent_id)
        return total

    for root in cache.namespace_roots().values():
        for child in root.children.values():
            walk(child, None)
    return out


token_seqs = st.lists(
    st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=12),
              st.sampled_from([None, None, "ns"])),
    min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(token_seqs, st.integers(0, 3))
def test_unbounded_summary_equals_the_brute_force_walk(seqs, locked):
    cache = build(seqs, locked)
    truth = brute_force(cache)
    summary = summarize_tree(cache, max_nodes=10_000, top=10_000)
    assert summary["visited_nodes"] == len(truth)
    assert summary["hidden_tokens"] == 0
    assert summary["total_tokens"] == sum(edge for edge, _, _, _ in truth.values())
    by_id = {n["id"]: n for n in summary["nodes"]}
    assert by_id.keys() == truth.keys()
    for node_id, (edge, subtree, ids, parent) in truth.items():
        node = by_id[node_id]
        assert (node["tokens"], node["subtree_tokens"], node["parent"]) == (edge, subtree, parent)
        assert node["head_ids"] == ids[:LABEL_TOKENS]
        assert node["hidden_children"] == 0
    assert (summary["evictable_tokens"] + summary["locked_tokens"]) == summary["total_tokens"]


@settings(max_examples=150, deadline=None)
@given(token_seqs, st.integers(1, 6), st.integers(1, 6))
def test_bounded_summary_visits_at_most_max_nodes_and_keeps_ancestors(seqs, max_nodes, top):
    cache = build(seqs)
    truth = brute_force(cache)
    summary = summarize_tree(cache, max_nodes=max_nodes, top=top)
    nodes = summary["nodes"]
    assert summary["visited_nodes"] == min(max_nodes, len(truth))
    ids = {n["id"] for n in nodes}
    for n in nodes:
        # every shown node's parent is shown too (a forest rooted at top-level nodes)
        assert n["parent"] is None or n["parent"] in ids
        assert n["parent"] == truth[n["id"]][3]
        # sizes count only what was visited: never more than the truth
        assert n["tokens"] <= n["subtree_tokens"] <= truth[n["id"]][1]
    visited_tokens = summary["total_tokens"] - summary["hidden_tokens"]
    assert visited_tokens <= summary["total_tokens"]
    # the walk opens the largest top-level edge first, so it is always among the visited
    every_visited = summarize_tree(cache, max_nodes=max_nodes, top=10_000)["nodes"]
    largest_top = max(t[0] for t in truth.values() if t[3] is None)
    assert max(n["tokens"] for n in every_visited if n["parent"] is None) == largest_top
    # and the shown nodes are the visited ones with the most tokens below them
    shown = sorted((n["subtree_tokens"] for n in nodes), reverse=True)[:top]
    assert shown == sorted((n["subtree_tokens"] for n in every_visited), reverse=True)[:top]


def test_a_large_tree_costs_the_bound_not_its_size():
    seqs = [([i // 100, i % 100, 7, 7, i], None) for i in range(3000)]
    cache = build(seqs)
    summary = summarize_tree(cache, max_nodes=64, top=16)
    assert summary["visited_nodes"] == 64
    assert len(summary["nodes"]) <= 64
    assert summary["hidden_tokens"] > 0
    assert summary["total_tokens"] == cache.total_tokens()
