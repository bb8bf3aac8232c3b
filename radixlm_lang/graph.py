"""Request graphs: what a traced program will send, and the prefixes worth sending once.

Nodes are the program's steps (constant text, role headers/footers, gen, select, fork, join,
variable scopes); edges say what a node needs first: ``text`` (the node continues the text of
the previous one), ``fork``/``join`` (branching and merging of states) and ``var`` (the node uses
the value of a variable another node produced). Each node belongs to a *stream*: the root state
is ``()``, branch ``i`` of the ``k``-th fork of stream ``p`` is ``p + ((k, i),)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Stream = tuple[tuple[int, int], ...]

# Kinds whose text is known before anything runs; the rest end a constant prefix.
_CONSTANT_KINDS = ("text", "role", "var_scope")


@dataclass
class Node:
    """One step of a traced program.

    Attributes:
        id: index in ``RequestGraph.nodes``.
        kind: text, role, gen, select, fork, join, var_scope or set_var.
        stream: the state the step belongs to.
        label: a short human description.
        text: the node's text when known before running (constant text, rendered role
            markers); None for dynamic nodes. For text containing variable references, only
            the part before the first reference.
        complete: whether ``text`` is all of the node's text.
        name: the variable the node defines, if any.
        attrs: kind-specific details (sampling parameters, choices, fork size, join mode...).
    """

    id: int
    kind: str
    stream: Stream
    label: str
    text: str | None = None
    complete: bool = False
    name: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    """``src`` must happen before ``dst``; ``kind`` is text, fork, join or var."""

    src: int
    dst: int
    kind: str


@dataclass
class RequestGraph:
    """The traced graph of one program call (see the module docstring)."""

    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    error: BaseException | None = None  # where tracing had to stop, if it did

    def stream_nodes(self, stream: Stream) -> list[Node]:
        """The nodes of one stream, in program order."""
        return [n for n in self.nodes if n.stream == stream]

    def constant_prefix(self, stream: Stream = ()) -> str:
        """The text a stream appends before its first step whose text is not known in advance."""
        pieces = []
        for node in self.stream_nodes(stream):
            if node.kind not in _CONSTANT_KINDS or node.text is None:
                break
            pieces.append(node.text)
            if not node.complete:
                break
        return "".join(pieces)

    def fork_prefixes(self) -> dict[tuple[Stream, int], str]:
        """Per fork ``(stream, ordinal)``: the constant text that all its branches begin with."""
        out = {}
        for node in self.nodes:
            if node.kind != "fork":
                continue
            ordinal, size = node.attrs["ordinal"], node.attrs["size"]
            branches = [self.constant_prefix(node.stream + ((ordinal, i),)) for i in range(size)]
            shared = hoistable_prefix(branches)
            if shared:
                out[(node.stream, ordinal)] = shared
        return out

    def summary(self) -> str:
        """A printable listing of nodes and edges."""
        kinds: dict[str, int] = {}
        for node in self.nodes:
            kinds[node.kind] = kinds.get(node.kind, 0) + 1
        counts = ", ".join(f"{k}={v}" for k, v in sorted(kinds.items()))
        lines = [f"RequestGraph: {len(self.nodes)} nodes ({counts}), {len(self.edges)} edges"]
        incoming: dict[int, list[str]] = {}
        for edge in self.edges:
            incoming.setdefault(edge.dst, []).append(f"{edge.kind}<-{edge.src}")
        for node in self.nodes:
            where = _stream_name(node.stream)
            deps = ", ".join(incoming.get(node.id, []))
            lines.append(f"  [{node.id}] {where:<12} {node.kind:<9} {node.label}  ({deps})")
        if self.error is not None:
            lines.append(f"  tracing stopped: {self.error}")
        return "\n".join(lines)

    __str__ = summary

    def to_dot(self) -> str:
        """Graphviz source: one cluster per stream, edge style per kind."""
        lines = ["digraph request_graph {", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
        for stream in dict.fromkeys(n.stream for n in self.nodes):
            cluster = "_".join(f"{k}_{i}" for k, i in stream) or "root"
            lines.append(f"  subgraph cluster_{cluster} {{")
            lines.append(f"    label={json.dumps(_stream_name(stream))};")
            for node in self.stream_nodes(stream):
                shape = _DOT_SHAPES.get(node.kind, "box")
                label = json.dumps(f"{node.kind}: {node.label}")
                lines.append(f"    n{node.id} [label={label}, shape={shape}];")
            lines.append("  }")
        for edge in self.edges:
            style = _DOT_STYLES.get(edge.kind, "solid")
            lines.append(f'  n{edge.src} -> n{edge.dst} [style={style}, label="{edge.kind}"];')
        lines.append("}")
        return "\n".join(lines)

    def to_mermaid(self) -> str:
        """Mermaid flowchart source."""
        lines = ["flowchart TD"]
        for node in self.nodes:
            label = _mermaid_escape(f"{node.kind}: {node.label}")
            left, right = _MERMAID_SHAPES.get(node.kind, ("[", "]"))
            lines.append(f'  n{node.id}{left}"{label}"{right}')
        for edge in self.edges:
            arrow = "-.->" if edge.kind == "var" else "-->"
            lines.append(f"  n{edge.src} {arrow}|{edge.kind}| n{edge.dst}")
        return "\n".join(lines)


def common_prefix(texts: list[str]) -> str:
    """The longest string every text starts with ("" for no texts)."""
    if not texts:
        return ""
    low, high = min(texts), max(texts)  # the lexicographic extremes bound every other text
    size = 0
    while size < min(len(low), len(high)) and low[size] == high[size]:
        size += 1
    return low[:size]


def hoistable_prefix(texts: list[str]) -> str:
    """The common prefix of ``texts``, cut where token boundaries are likely to agree.

    A prefix that ends mid-word or in a space would tokenize differently from the full texts
    (BPE vocabularies attach the space to the next word), so the cut moves back to the last
    whitespace and drops trailing spaces: the cached tokens then match the requests' tokens.
    """
    shared = common_prefix(texts)
    if any(len(t) > len(shared) and not t[len(shared)].isspace() for t in texts):
        cut = max(shared.rfind(" "), shared.rfind("\n"))
        shared = shared[: cut + 1]
    return shared.rstrip(" ")


def _stream_name(stream: Stream) -> str:
    return "root" if not stream else "root" + "".join(f"/fork{k}[{i}]" for k, i in stream)


def _mermaid_escape(text: str) -> str:
    return text.replace('"', "#quot;").replace("\n", "\\n")


_DOT_SHAPES = {"gen": "ellipse", "select": "diamond", "fork": "trapezium", "join": "invtrapezium"}
_DOT_STYLES = {"var": "dashed", "fork": "bold", "join": "bold"}
_MERMAID_SHAPES = {"gen": ("([", "])"), "select": ("{", "}"), "fork": ("[/", "\\]"),
                   "join": ("[\\", "/]")}  # fmt: skip
