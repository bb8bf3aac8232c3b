"""A request as the engine core sees it: token ids in, token ids out, plus its KV bookkeeping."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radixlm.sampling_params import SamplingParams
from radixlm.slots import EMPTY_SLOTS, SLOT_DTYPE


@dataclass(frozen=True)
class LogprobOptions:
    """What logprobs a request wants back.

    Attributes:
        return_logprob: return the sampled tokens' logprobs.
        top_logprobs_num: also the top-k alternatives at each position.
        logprob_start_len: first prompt position whose token logprob is returned; -1 for none.
        return_text: each ``(logprob, token_id, text)`` entry carries the token's text;
            False leaves None there (SGLang's ``return_text_in_logprobs``).
    """

    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    return_text: bool = True

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0


class FinishKind(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class FinishReason:
    kind: FinishKind
    matched: str | int | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind.value, "matched": self.matched}
        if self.message is not None:
            out["message"] = self.message
        return out


class RequestStatus(enum.Enum):
    WAITING_GRAMMAR = "waiting_grammar"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Scheduler-side state of one sequence.

    The sequence is ``input_ids + output_ids``. The first ``num_computed`` tokens have K/V in the
    pool at ``kv_slots[:num_computed]``; of those, the first ``tree_len`` slots belong to the radix
    tree (the request holds a lock on ``tree_node``), the rest to the request. Slots are int64
    numpy arrays (:mod:`radixlm.slots`): the scheduler touches them for every running request
    every step, and numpy's per-operation cost is a fraction of torch's.
    """

    rid: str
    input_ids: list[int]
    params: SamplingParams
    logprob: LogprobOptions = field(default_factory=LogprobOptions)
    namespace: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish: FinishReason | None = None
    # KV bookkeeping (owned by sched.kv_manager)
    _kv_buf: np.ndarray = field(default_factory=lambda: EMPTY_SLOTS)
    _kv_len: int = 0
    spare_slots: np.ndarray = field(default_factory=lambda: EMPTY_SLOTS)
    num_computed: int = 0
    tree_len: int = 0
    tree_node: Any = None
    cached_tokens: int | None = None
    # constrained decoding: a matcher from radixlm.constrained, or None
    matcher: Any = None
    grammar_future: Any = None
    jump_forward_tokens: int = 0
    # stop strings are checked on the core side with an incremental detokenizer
    stop_checker: Any = None
    num_retractions: int = 0
    # Bumped whenever the request stops running (finish, abort, retraction): a launched step
    # that carries an older epoch in its row is stale and its result for this request is dropped.
    epoch: int = 0
    # input-token logprobs gathered over prefill chunks, sent once the prefill completes
    input_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)

    @property
    def kv_slots(self) -> np.ndarray:
        """Slots of the tokens computed or scheduled so far, in sequence order (a view)."""
        return self._kv_buf[: self._kv_len]

    @kv_slots.setter
    def kv_slots(self, slots: np.ndarray) -> None:
        # Taken over, not copied: callers hand in an array nobody else holds.
        self._kv_buf = slots
        self._kv_len = len(slots)

    def kv_slots_until(self, end: int) -> np.ndarray:
        """``kv_slots[:end]`` in one slice (a view)."""
        return self._kv_buf[: min(end, self._kv_len)]

    def append_slots(self, slots: np.ndarray) -> None:
        """Append slots in amortised O(len(slots)): the buffer grows by doubling."""
        end = self._kv_len + len(slots)
        self._reserve_kv(end)
        self._kv_buf[self._kv_len : end] = slots
        self._kv_len = end

    def append_slot(self, slot: int) -> None:
        """Append one slot (a decode step's); amortised O(1)."""
        end = self._kv_len + 1
        self._reserve_kv(end)
        self._kv_buf[self._kv_len] = slot
        self._kv_len = end

    def _reserve_kv(self, size: int) -> None:
        """Grow the slot buffer (by doubling) so it holds ``size`` slots.

        Slot views handed out earlier (scheduled rows) keep pointing at the old buffer, whose
        first ``_kv_len`` entries never change, so they stay valid.
        """
        if size > len(self._kv_buf):
            grown = np.empty(max(size, 2 * len(self._kv_buf), 64), dtype=SLOT_DTYPE)
            grown[: self._kv_len] = self._kv_buf[: self._kv_len]
            self._kv_buf = grown

    @property
    def seq(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish is not None

    @property
    def remaining_new_tokens(self) -> int:
        return max(self.params.max_new_tokens - len(self.output_ids), 0)

    def match_limit(self) -> int:
        """How many leading tokens may come from the cache.

        At least one token must be computed to produce logits; input logprobs need the logits of
        every position from ``logprob_start_len - 1`` on, so those must be computed too.
        """
        limit = self.seq_len - 1
        if self.logprob.wants_input_logprobs and not self.output_ids:
            limit = min(limit, max(self.logprob.logprob_start_len, 1) - 1)
        return max(limit, 0)
