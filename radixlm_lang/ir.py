"""The expressions a program appends to its state (``s += expr``).

Expressions are plain immutable data; the interpreter executes them and the tracer records them.
``a + b`` concatenates two expressions (or an expression and a string) into one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixlm_lang.choices import ChoicesMethod

# SGLang programs import the dtype regexes from its ``ir`` module; they are importable here too.
from radixlm_lang.dtypes import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR  # noqa: F401
from radixlm_lang.sampling import SamplingParams

ROLES = ("system", "user", "assistant")


class Expr:
    """Base of every expression; supports ``+`` to build a concatenation."""

    def __add__(self, other: Any) -> Concat:
        return Concat((self, to_expr(other)))

    def __radd__(self, other: Any) -> Concat:
        return Concat((to_expr(other), self))

    def flatten(self) -> list[Expr]:
        """This expression as a flat list of non-concatenation expressions."""
        return [self]


@dataclass(frozen=True)
class Text(Expr):
    """Constant text."""

    text: str


@dataclass(frozen=True)
class Concat(Expr):
    """Several expressions appended in order."""

    parts: tuple[Expr, ...]

    def flatten(self) -> list[Expr]:
        return [leaf for part in self.parts for leaf in part.flatten()]


@dataclass(frozen=True)
class Gen(Expr):
    """Generate text from the model; stored in variable ``name`` when it has one.

    ``dtype`` (int, float, str or bool) constrains the output with a regex and converts the value.
    """

    name: str | None
    params: SamplingParams = field(default_factory=SamplingParams)
    dtype: type | None = None


@dataclass(frozen=True)
class Select(Expr):
    """Append the choice the model scores best; stored in variable ``name``."""

    name: str | None
    choices: tuple[str, ...]
    method: ChoicesMethod


@dataclass(frozen=True)
class RoleBegin(Expr):
    """Open a chat message of ``role``; the chat template renders its header."""

    role: str


@dataclass(frozen=True)
class RoleEnd(Expr):
    """Close the open chat message of ``role``."""

    role: str


@dataclass(frozen=True)
class VarScopeBegin(Expr):
    """Start capturing the appended text into variable ``name``."""

    name: str


@dataclass(frozen=True)
class VarScopeEnd(Expr):
    """Stop capturing into variable ``name``."""

    name: str


@dataclass(frozen=True)
class SeparateReasoning(Expr):
    """Split the reasoning out of variable ``name`` (set by the gen or select just before).

    ``name`` keeps the answer; ``name + "_reasoning_content"`` receives the reasoning.
    """

    name: str
    model_type: str | None


@dataclass(frozen=True)
class Call(Expr):
    """A program called without a state inside another program: ``s += sub(x=...)``.

    Appending it runs ``sub``'s body on the state it is appended to, as ``sub(s, x=...)`` does.
    """

    function: Any
    args: tuple
    kwargs: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Join(Expr):
    """Merge forked states back into their parent (queued in the parent's order)."""

    forks: Any  # the ForkedStates being joined; kept opaque to avoid a cycle with state.py
    mode: str


def to_expr(value: Any) -> Expr:
    """Turn a string (or expression) into an expression.

    Raises:
        TypeError: for anything else, naming the type.
    """
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    if value is None:
        raise TypeError("cannot append None to a program state")
    raise TypeError(f"cannot append a {type(value).__name__} to a program state; use str or gen()")


def role(name: str, expr: Any = None) -> Expr:
    """A whole chat message: header, ``expr`` (text, gen, ...), end of message."""
    inner = [] if expr is None else [to_expr(expr)]
    return Concat((RoleBegin(name), *inner, RoleEnd(name)))
