"""A bounded summary of the radix tree: its largest nodes, for display.

A tree can hold millions of nodes, and the summary is taken between scheduler steps, so it must
cost the same whatever the tree's size. It expands nodes largest edge first from the roots and
stops after ``max_nodes``; everything below the nodes it did not open is counted in their
parent's ``hidden_children`` and in the summary's ``hidden_tokens``, never walked.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from dataclasses import asdict, dataclass
from typing import Any

from radixlm.kvcache.radix_tree import RadixCache, TreeNode

# Token ids kept per node: enough for a readable label once decoded.
LABEL_TOKENS = 24


@dataclass(frozen=True)
class NodeSummary:
    """One node of the summary.

    Attributes:
        id: ``id()`` of the node (stable while the node lives; admissions refer to it).
        parent: id of the parent in the summary, or None for a namespace's top-level node.
        namespace: the namespace the node belongs to (None: the default one).
        tokens: tokens on the node's edge.
        subtree_tokens: tokens of this node plus its descendants that the summary visited.
        lock_ref: locks held on the node or below it (> 0: not evictable).
        age: logical ticks since the node was last matched or inserted through.
        hidden_children: children the summary did not visit.
        head_ids: the edge's first token ids, for a label.
    """

    id: int
    parent: int | None
    namespace: str | None
    tokens: int
    subtree_tokens: int
    lock_ref: int
    age: int
    hidden_children: int
    head_ids: list[int]


def summarize_tree(tree: RadixCache, max_nodes: int = 512, top: int = 200) -> dict[str, Any]:
    """The ``top`` largest of at most ``max_nodes`` nodes visited largest-edge first.

    Args:
        tree: the radix cache.
        max_nodes: nodes visited at most (bounds the cost whatever the tree's size).
        top: nodes returned at most, by ``subtree_tokens``; their ancestors are always kept, so
            the returned nodes form a forest rooted at top-level nodes.

    Returns:
        ``{"nodes": [NodeSummary as dict, ...], "total_tokens", "evictable_tokens",
        "locked_tokens", "visited_nodes", "hidden_tokens"}``; ``hidden_tokens`` are tokens held
        by nodes the walk did not reach.
    """
    visited, parent_of, namespace_of = _visit(tree, max_nodes)
    subtree = {id(n): n.num_tokens for n in visited}
    for node in reversed(visited):  # children come after their parents in visit order
        parent = parent_of[id(node)]
        if parent is not None:
            subtree[parent] += subtree[id(node)]
    kept = _keep_top(visited, subtree, parent_of, top)
    seen = {id(n) for n in visited}
    clock = tree.clock
    nodes = [
        asdict(NodeSummary(
            id=id(n), parent=parent_of[id(n)], namespace=namespace_of[id(n)],
            tokens=n.num_tokens, subtree_tokens=subtree[id(n)], lock_ref=n.lock_ref,
            age=max(0, clock - n.last_access),
            hidden_children=sum(1 for c in n.children.values() if id(c) not in seen),
            head_ids=_head_ids(n)))
        for n in visited if id(n) in kept
    ]
    visited_tokens = sum(n.num_tokens for n in visited)
    return {
        "nodes": nodes,
        "total_tokens": tree.total_tokens(),
        "evictable_tokens": tree.evictable_tokens(),
        "locked_tokens": tree.locked_tokens(),
        "visited_nodes": len(visited),
        "hidden_tokens": max(0, tree.total_tokens() - visited_tokens),
    }


def _visit(tree: RadixCache, max_nodes: int):
    order = itertools.count()
    heap: list[tuple[int, int, TreeNode, int | None, str | None]] = []
    for namespace, root in tree.namespace_roots().items():
        for child in root.children.values():
            heapq.heappush(heap, (-child.num_tokens, next(order), child, None, namespace))
    visited: list[TreeNode] = []
    parent_of: dict[int, int | None] = {}
    namespace_of: dict[int, str | None] = {}
    while heap and len(visited) < max_nodes:
        _, _, node, parent, namespace = heapq.heappop(heap)
        visited.append(node)
        parent_of[id(node)] = parent
        namespace_of[id(node)] = namespace
        for child in node.children.values():
            heapq.heappush(heap, (-child.num_tokens, next(order), child, id(node), namespace))
    return visited, parent_of, namespace_of


def _keep_top(visited: list[TreeNode], subtree: dict[int, int],
              parent_of: dict[int, int | None], top: int) -> set[int]:
    largest = sorted(visited, key=lambda n: subtree[id(n)], reverse=True)[:top]
    kept: set[int] = set()
    for node in largest:
        key: int | None = id(node)
        while key is not None and key not in kept:  # keep the path up to a top-level node
            kept.add(key)
            key = parent_of[key]
    return kept


def _head_ids(node: TreeNode) -> list[int]:
    count = min(node.num_tokens, LABEL_TOKENS)
    return list(struct.unpack_from(f"={count}i", node.key))  # the same packing as the tree's
