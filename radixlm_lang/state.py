"""The program state ``s`` a program appends to, and the states a fork produces.

A state is a thin handle over an executor: the interpreter's :class:`StreamExecutor` when the
program runs, the tracer's executor when it is traced. Both offer the same small interface
(submit, get_var, set_var, fork, sync, text, current_messages, meta_info, error, chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from radixlm_lang import ir


class ProgramState:
    """What a program function receives as ``s`` and what ``run`` returns."""

    def __init__(self, executor: Any):
        self._executor = executor
        self.ret_value: Any = None  # what the program function returned (set by run)

    # ---- building ----

    def __iadd__(self, other: Any) -> ProgramState:
        pending: list[ir.Expr] = []
        for leaf in ir.to_expr(other).flatten():
            if isinstance(leaf, ir.Call):
                # A sub-program's body appends to this state itself, after what came before.
                if pending:
                    self._executor.submit(ir.Concat(tuple(pending)))
                    pending = []
                leaf.function.func(self, *leaf.args, **leaf.kwargs)
            else:
                pending.append(leaf)
        if pending:
            self._executor.submit(ir.Concat(tuple(pending)))
        return self

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> ForkedStates:
        """Copy the state ``size`` times; the branches then run concurrently.

        The text so far is sent once first so the server's prefix cache holds it.

        Args:
            size: the number of branches.
            position_ids_offset: SGLang's per-branch position offsets; only None is supported
                (every branch continues the parent's positions).
        """
        if position_ids_offset is not None:
            raise NotImplementedError("fork(position_ids_offset=...) is not supported: every "
                                      "branch continues at the parent's positions")  # fmt: skip
        children = self._executor.fork(size)
        return ForkedStates(self._executor, [ProgramState(c) for c in children])

    @contextlib.contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """``with s.copy() as c: ...``: a one-branch fork, joined (gather) when the block ends.

        The variables the copy sets come back to ``s`` as one-element lists; its text does not.
        """
        forks = self.fork(1)
        try:
            yield forks[0]
        finally:
            forks.join()

    @contextlib.contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Capture the text appended inside the ``with`` block into variable ``name``."""
        self._executor.submit(ir.VarScopeBegin(name))
        yield
        self._executor.submit(ir.VarScopeEnd(name))

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        """Everything appended inside the ``with`` block forms one chat message of ``name``."""
        self._executor.submit(ir.RoleBegin(name))
        yield
        self._executor.submit(ir.RoleEnd(name))

    def _role_call(self, name: str, expr: Any) -> Any:
        if expr is None:
            return self.role(name)
        message = ir.role(name, expr)
        self += message
        return message

    def system(self, expr: Any = None) -> Any:
        """``s.system(expr)`` appends a system message; ``with s.system(): ...`` opens one."""
        return self._role_call("system", expr)

    def user(self, expr: Any = None) -> Any:
        """``s.user(expr)`` appends a user message; ``with s.user(): ...`` opens one."""
        return self._role_call("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        """``s.assistant(expr)`` appends an assistant message; ``with s.assistant():`` opens one."""
        return self._role_call("assistant", expr)

    # ---- reading ----

    def __getitem__(self, name: str) -> Any:
        return self._executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        self._executor.sync()
        return name in self._executor.variables

    def get_var(self, name: str) -> Any:
        """The value of variable ``name`` (waits for the step that sets it)."""
        return self._executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        """Set variable ``name``."""
        self._executor.set_var(name, value)

    def variables(self) -> dict[str, Any]:
        """All variables, after every queued step has run."""
        self._executor.sync()
        return dict(self._executor.variables)

    def text(self) -> str:
        """The full text (prompt and generations), after every queued step has run."""
        self._executor.sync()
        return self._executor.text

    def messages(self) -> list[dict[str, str]]:
        """The chat messages as ``{"role", "content"}`` dicts."""
        self._executor.sync()
        return self._executor.current_messages()

    def get_meta_info(self, name: str) -> Any:
        """The backend's meta_info of the gen or select that set ``name`` (None if none)."""
        self._executor.sync()
        return self._executor.meta_info.get(name)

    def error(self) -> BaseException | None:
        """The first error the program hit (its later steps were skipped), or None."""
        self._executor.sync()
        return self._executor.error

    def sync(self) -> None:
        """Wait until every queued step has run."""
        self._executor.sync()

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Yield the text as it is appended, until the program ends.

        Args:
            var_name: only the generated text of this variable (None: all text, prompts
                included).
        """
        for _, piece in self._executor.chunks(var_name):
            if piece:
                yield piece

    async def text_async_iter(
        self, var_name: str | None = None, return_meta_data: bool = False
    ) -> AsyncIterator[Any]:
        """``async for`` version of :meth:`text_iter`; the waiting happens off the event loop.

        Args:
            var_name: only the generated text of this variable.
            return_meta_data: with ``var_name``, yield ``(piece, meta_info)`` pairs, where
                ``meta_info`` is the variable's meta_info once its generation has finished
                (``{}`` before).
        """
        iterator = self._executor.chunks(var_name)
        done = object()
        while True:
            item = await asyncio.to_thread(next, iterator, done)
            if item is done:
                return
            meta, piece = item
            if return_meta_data and var_name is not None:
                yield piece, meta
            elif piece:
                yield piece

    def __repr__(self) -> str:
        # SGLang's form; programs slice the text out of it.
        return f"ProgramState({self.text()})"


# SGLang's spellings and radixlm's short ones.
JOIN_MODES = {
    "gather_variable": "gather",
    "gather": "gather",
    "concate_and_append": "concat",
    "concat": "concat",
}


class ForkedStates:
    """The states of one fork: index them, iterate them, ``+=`` to all, ``join`` them back."""

    def __init__(self, parent: Any, states: list[ProgramState]):
        self._parent = parent
        self._states = states

    @property
    def executors(self) -> list[Any]:
        return [state._executor for state in self._states]

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self._states)

    def __getitem__(self, index: int) -> ProgramState:
        return self._states[index]

    def __setitem__(self, index: int, state: ProgramState) -> None:
        # ``forks[i] += x`` assigns the (same) state back; anything else is a mistake.
        if state is not self._states[index]:
            raise TypeError("fork items can only be extended with +=, not replaced")

    def __iadd__(self, other: Any) -> ForkedStates:
        """Append to every branch: the same expression, ``f(i)`` for a callable, or one item
        of a list/tuple per branch."""
        if callable(other) and not isinstance(other, ir.Expr):
            parts = [other(i) for i in range(len(self._states))]
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self._states):
                raise ValueError(f"{len(other)} items for {len(self._states)} fork branches")
            parts = list(other)
        else:
            parts = [other] * len(self._states)
        for state, part in zip(self._states, parts):
            state += part
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Merge the branches back into the parent, in the parent's order of steps.

        Args:
            mode: ``"gather_variable"`` (or ``"gather"``): every variable the branches set
                comes back to the parent as a list (one value per branch);
                ``"concate_and_append"`` (or ``"concat"``): the branches' text (and messages)
                is appended to the parent in branch order.
        """
        canonical = JOIN_MODES.get(mode)
        if canonical is None:
            raise ValueError(f"join mode must be one of {sorted(JOIN_MODES)}, not {mode!r}")
        self._parent.submit(ir.Join(self, canonical))
