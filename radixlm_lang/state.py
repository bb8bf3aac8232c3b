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

    # ---- building ----

    def __iadd__(self, other: Any) -> ProgramState:
        self._executor.submit(ir.to_expr(other))
        return self

    def fork(self, size: int = 1) -> ForkedStates:
        """Copy the state ``size`` times; the branches then run concurrently.

        The text so far is sent once first so the server's prefix cache holds it.
        """
        children = self._executor.fork(size)
        return ForkedStates(self._executor, [ProgramState(c) for c in children])

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

    def system(self):
        """``with s.system(): ...``: a system message."""
        return self.role("system")

    def user(self):
        """``with s.user(): ...``: a user message."""
        return self.role("user")

    def assistant(self):
        """``with s.assistant(): ...``: an assistant message."""
        return self.role("assistant")

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

    def text_iter(self, var: str | None = None) -> Iterator[str]:
        """Yield the text as it is appended, until the program ends.

        Args:
            var: only the generated text of this variable (None: all text, prompts included).
        """
        return self._executor.chunks(var)

    async def text_async_iter(self, var: str | None = None) -> AsyncIterator[str]:
        """``async for`` version of :meth:`text_iter`; the waiting happens off the event loop."""
        iterator = self._executor.chunks(var)
        done = object()
        while True:
            piece = await asyncio.to_thread(next, iterator, done)
            if piece is done:
                return
            yield piece

    def __repr__(self) -> str:
        return f"ProgramState(text={self._executor.text[-60:]!r})"


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
        for state in self._states:
            state += other
        return self

    def join(self, mode: str = "gather") -> None:
        """Merge the branches back into the parent, in the parent's order of steps.

        Args:
            mode: ``"gather"``: every variable the branches set comes back to the parent as a
                list (one value per branch); ``"concat"``: the branches' text (and messages)
                is appended to the parent in branch order.
        """
        if mode not in ("gather", "concat"):
            raise ValueError(f"join mode must be 'gather' or 'concat', not {mode!r}")
        self._parent.submit(ir.Join(self, mode))
