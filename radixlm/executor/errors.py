"""Executor errors the engine must not survive."""

from __future__ import annotations


class RunnerDeadError(RuntimeError):
    """The runner can run no more steps (a tensor-parallel worker died or failed); unlike a
    failed batch, this ends the engine: its message says which rank and why."""
