"""Bounded records of what the scheduler did lately, for the dashboard.

Every record is plain data appended to a fixed-size ring, so keeping them costs a few
microseconds per step and memory that never grows; ``snapshot`` copies the rings into lists of
dicts that cross the process boundary as they are.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

# How many token ids of a prompt a request record keeps (enough to show where its cached
# prefix ends; the dashboard decodes and cuts them).
PROMPT_HEAD_TOKENS = 48
PROMPT_TAIL_TOKENS = 16


@dataclass(frozen=True)
class BatchRecord:
    """One launched batch.

    Attributes:
        time: wall-clock seconds (time.time()) when it was launched.
        kind: "extend" (only prefill rows), "decode" (only decode rows) or "mixed".
        num_seqs: rows in the batch.
        num_tokens: new tokens the forward pass computes.
        num_extend_seqs: rows that prefill (more than one new token, or the first).
    """

    time: float
    kind: str
    num_seqs: int
    num_tokens: int
    num_extend_seqs: int


@dataclass(frozen=True)
class AdmissionRecord:
    """One request admitted to run, with how much of its prompt the radix cache held.

    Attributes:
        time: wall-clock seconds of admission.
        rid: the request id.
        prompt_tokens: prompt length.
        cached_tokens: leading prompt tokens reused from the cache.
        node_id: ``id()`` of the radix node its match ended at (None: nothing matched).
        head_ids: the first prompt tokens; tail_ids: the tokens just after the cached prefix.
    """

    time: float
    rid: str
    prompt_tokens: int
    cached_tokens: int
    node_id: int | None
    head_ids: list[int]
    tail_ids: list[int]


@dataclass(frozen=True)
class CompileRecord:
    """One finished grammar compilation as a request saw it (queue wait included).

    Attributes:
        time: wall-clock seconds when it finished.
        kind: constraint kind ("json_schema", "regex", ...).
        ms: milliseconds from submission to the compiled grammar being installed.
        ok: False when compilation failed.
    """

    time: float
    kind: str
    ms: float
    ok: bool


class Telemetry:
    """Rings of the most recent batches, admissions and compilations.

    Args:
        max_batches: batches kept.
        max_requests: admissions kept.
        max_compiles: compilations kept.
    """

    def __init__(self, max_batches: int = 256, max_requests: int = 64, max_compiles: int = 64):
        self.batches: deque[BatchRecord] = deque(maxlen=max_batches)
        self.admissions: deque[AdmissionRecord] = deque(maxlen=max_requests)
        self.compiles: deque[CompileRecord] = deque(maxlen=max_compiles)
        self._compiling: dict[str, tuple[str, float]] = {}

    def on_batch(self, num_seqs: int, num_tokens: int, prefill_seqs: int) -> None:
        """Record a batch.

        Args:
            num_seqs: rows in the batch.
            num_tokens: new tokens of all rows.
            prefill_seqs: rows that prefill (the scheduler knows; one new token can be a prefill).
        """
        kind = "decode" if prefill_seqs == 0 else (
            "extend" if prefill_seqs == num_seqs else "mixed")
        self.batches.append(BatchRecord(time.time(), kind, num_seqs, num_tokens, prefill_seqs))

    def on_admitted(self, rid: str, input_ids: list[int], cached: int, node: Any) -> None:
        """Record a request's first admission and its prefix match."""
        tail = input_ids[cached:cached + PROMPT_TAIL_TOKENS]
        node_id = id(node) if node is not None and cached > 0 else None
        self.admissions.append(AdmissionRecord(
            time.time(), rid, len(input_ids), cached, node_id,
            list(input_ids[:PROMPT_HEAD_TOKENS]), list(tail)))

    def on_compile_started(self, rid: str, kind: str) -> None:
        """A request started waiting for its constraint to compile."""
        self._compiling[rid] = (kind, time.monotonic())

    def on_compile_finished(self, rid: str, ok: bool) -> None:
        """The request's grammar is installed (ok) or its compilation failed."""
        started = self._compiling.pop(rid, None)
        if started is not None:
            kind, t0 = started
            ms = (time.monotonic() - t0) * 1000.0
            self.compiles.append(CompileRecord(time.time(), kind, ms, ok))

    def on_request_gone(self, rid: str) -> None:
        """The request finished; it no longer waits for a compilation."""
        self._compiling.pop(rid, None)

    def snapshot(self) -> dict[str, Any]:
        """Plain lists of dicts, oldest first."""
        return {
            "batches": [asdict(b) for b in self.batches],
            "admissions": [asdict(a) for a in self.admissions],
            "compiles": [asdict(c) for c in self.compiles],
            "compiles_pending": len(self._compiling),
        }
