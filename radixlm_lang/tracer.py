"""Symbolic execution of a program into a :class:`RequestGraph`.

The tracer runs the program's Python code with a state whose executor records steps instead of
running them. Reading a variable yields a :class:`VarRef`: a string that carries a marker, so
text built from it (``"Q: " + s["q"]``, f-strings) still shows where the value is used and the
graph gets a ``var`` edge. Code that needs the actual value (``int(s["n"])``) stops the trace;
the graph keeps what was recorded up to there, with the reason in ``graph.error``.
"""

from __future__ import annotations

import re
from typing import Any

from radixlm_lang import ir
from radixlm_lang.chat import ChatRenderer
from radixlm_lang.graph import Edge, Node, RequestGraph, Stream
from radixlm_lang.reasoning import REASONING_SUFFIX

_REF_OPEN, _REF_CLOSE = "\ue000", "\ue001"
_REF_PATTERN = re.compile(f"{_REF_OPEN}([^{_REF_CLOSE}]*){_REF_CLOSE}")


class VarRef(str):
    """The traced stand-in for a variable's value: a string holding a marker for ``name``."""

    def __new__(cls, name: str) -> VarRef:
        ref = super().__new__(cls, f"{_REF_OPEN}{name}{_REF_CLOSE}")
        ref.var_name = name
        return ref

    def __int__(self) -> int:
        raise TypeError(f"the program converts variable {self.var_name!r}; tracing stops here")

    def __float__(self) -> float:
        raise TypeError(f"the program converts variable {self.var_name!r}; tracing stops here")


def display(text: str) -> str:
    """Text with variable markers shown as ``{name}``."""
    return _REF_PATTERN.sub(lambda m: "{" + m.group(1) + "}", text)


class _Builder:
    """The graph under construction, shared by every stream's executor."""

    def __init__(self) -> None:
        self.graph = RequestGraph()

    def add(self, stream: Stream, kind: str, label: str, **fields: Any) -> Node:
        node = Node(id=len(self.graph.nodes), kind=kind, stream=stream, label=label, **fields)
        self.graph.nodes.append(node)
        return node

    def link(self, src: int | None, dst: int, kind: str) -> None:
        if src is not None:
            self.graph.edges.append(Edge(src, dst, kind))


class TraceExecutor:
    """Records one stream's steps into the graph (same interface as the interpreter's executor).

    Args:
        builder: the shared graph under construction.
        renderer: renders role markers when a backend is known (else they stay symbolic).
        stream: this stream's path in the fork tree.
    """

    def __init__(self, builder: _Builder, renderer: ChatRenderer | None, stream: Stream = ()):
        self._builder = builder
        self._renderer = renderer
        self.stream = stream
        self.text = ""
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.error = None
        self.messages: list[dict[str, str]] = []
        self._producers: dict[str, int] = {}
        self._last: int | None = None
        self._first_edge = "text"
        self._forks_made = 0
        self._role_open = False

    # ---- the executor interface ----

    def submit(self, expr: ir.Expr) -> None:
        for leaf in expr.flatten():
            getattr(self, "_record_" + type(leaf).__name__)(leaf)

    def get_var(self, name: str) -> VarRef:
        return VarRef(name)

    def set_var(self, name: str, value: Any) -> None:
        node = self._add("set_var", f"{name} = {display(str(value))[:40]}", name=name)
        self._uses(str(value), node.id)
        self._define(name, node.id)

    def fork(self, size: int) -> list[TraceExecutor]:
        ordinal = self._forks_made
        self._forks_made += 1
        node = self._add("fork", f"fork {size}", attrs={"size": size, "ordinal": ordinal})
        return [self._child(node.id, (ordinal, i)) for i in range(size)]

    def sync(self) -> None:
        """Nothing runs while tracing."""

    def end(self) -> None:
        """Nothing runs while tracing."""

    def current_messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages]

    def chunks(self, var: str | None = None):
        return iter(())

    # ---- recording ----

    def _record_Text(self, expr: ir.Text) -> None:
        constant, _, _ = expr.text.partition(_REF_OPEN)
        complete = constant == expr.text
        last = self._last_node()
        if complete and last is not None and last.kind == "text" and last.complete:
            last.text += expr.text  # merge runs of constant text into one node
            last.label = _quote(last.text)
        else:
            node = self._add("text", _quote(display(expr.text)), text=constant, complete=complete)
            self._uses(expr.text, node.id)
        self.text += display(expr.text)
        self._append_to_message(display(expr.text))

    def _record_Gen(self, expr: ir.Gen) -> None:
        attrs = expr.params.set_fields()
        if expr.dtype is not None:
            attrs["dtype"] = expr.dtype.__name__
        details = ", ".join(f"{k}={v!r}" for k, v in attrs.items())
        node = self._add("gen", f"{expr.name or '(unnamed)'} ({details})", name=expr.name,
                         attrs=attrs)  # fmt: skip
        self._define(expr.name, node.id)
        self._append_to_message("{" + (expr.name or "gen") + "}")

    def _record_Select(self, expr: ir.Select) -> None:
        label = f"{expr.name or '(unnamed)'} in {list(expr.choices)} by {expr.method.name}"
        attrs = {"choices": list(expr.choices), "method": expr.method.name}
        node = self._add("select", label, name=expr.name, attrs=attrs)
        self._define(expr.name, node.id)
        self._append_to_message("{" + (expr.name or "select") + "}")

    def _record_RoleBegin(self, expr: ir.RoleBegin) -> None:
        history = tuple(m["role"] for m in self.messages)
        text = self._renderer.header(history, expr.role) if self._renderer else None
        self.messages.append({"role": expr.role, "content": ""})
        self._role_open = True
        self._add("role", f"{expr.role} begin", text=text, complete=text is not None,
                  attrs={"role": expr.role, "edge": "begin"})  # fmt: skip

    def _record_RoleEnd(self, expr: ir.RoleEnd) -> None:
        roles = tuple(m["role"] for m in self.messages)
        text = self._renderer.footer(roles) if self._renderer else None
        self._role_open = False
        self._add("role", f"{expr.role} end", text=text, complete=text is not None,
                  attrs={"role": expr.role, "edge": "end"})  # fmt: skip

    def _record_VarScopeBegin(self, expr: ir.VarScopeBegin) -> None:
        self._add("var_scope", f"{expr.name} begin", text="", complete=True, name=expr.name)

    def _record_VarScopeEnd(self, expr: ir.VarScopeEnd) -> None:
        node = self._add("var_scope", f"{expr.name} end", text="", complete=True, name=expr.name)
        self._define(expr.name, node.id)

    def _record_SeparateReasoning(self, expr: ir.SeparateReasoning) -> None:
        # Rewrites the gen's variable and adds the reasoning one; no text is added.
        label = f"{expr.name} = separate_reasoning({expr.model_type or 'think'})"
        node = self._add("set_var", label, name=expr.name, attrs={"model_type": expr.model_type})
        self._builder.link(self._producers.get(expr.name), node.id, "var")
        self._define(expr.name, node.id)
        self._define(expr.name + REASONING_SUFFIX, node.id)

    def _record_Join(self, expr: ir.Join) -> None:
        node = self._add("join", f"join {expr.mode}", attrs={"mode": expr.mode})
        for child in expr.forks.executors:
            self._builder.link(child._last, node.id, "join")
            if expr.mode == "gather":
                for name in child._producers:
                    if child._producers[name] != self._producers.get(name):
                        self._define(name, node.id)

    # ---- helpers ----

    def _add(self, kind: str, label: str, **fields: Any) -> Node:
        node = self._builder.add(self.stream, kind, label, **fields)
        self._builder.link(self._last, node.id, self._first_edge)
        self._last, self._first_edge = node.id, "text"
        return node

    def _last_node(self) -> Node | None:
        if self._last is None:
            return None
        node = self._builder.graph.nodes[self._last]
        return node if node.stream == self.stream else None

    def _define(self, name: str | None, node_id: int) -> None:
        if name is not None:
            self._producers[name] = node_id
            self.variables[name] = VarRef(name)

    def _uses(self, text: str, node_id: int) -> None:
        for name in dict.fromkeys(_REF_PATTERN.findall(text)):
            self._builder.link(self._producers.get(name), node_id, "var")

    def _append_to_message(self, text: str) -> None:
        if self._role_open:
            self.messages[-1]["content"] += text

    def _child(self, fork_node: int, step: tuple[int, int]) -> TraceExecutor:
        child = TraceExecutor(self._builder, self._renderer, self.stream + (step,))
        child.text = self.text
        child.messages = self.current_messages()
        child.variables = dict(self.variables)
        child._producers = dict(self._producers)
        child._last, child._first_edge = fork_node, "fork"
        child._role_open = self._role_open
        return child


def trace_program(func: Any, args: tuple, kwargs: dict, renderer: ChatRenderer | None):
    """Run ``func`` symbolically.

    Returns:
        The graph (with ``error`` set if the program could not be followed to its end).
    """
    from radixlm_lang.state import ProgramState

    builder = _Builder()
    try:
        func(ProgramState(TraceExecutor(builder, renderer)), *args, **kwargs)
    except Exception as exc:
        builder.graph.error = exc
    return builder.graph


def _quote(text: str, limit: int = 48) -> str:
    short = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(short)
