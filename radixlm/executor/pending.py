"""A launched step whose results are still on their way to the host.

``ModelRunner.launch`` enqueues a step's device work and returns a :class:`PendingStep` at once;
its :meth:`PendingStep.result` waits for the step and builds the ``StepResult``. In between the
host is free to schedule and launch the next step, whose placeholder input ids point into
:attr:`PendingStep.token_ids` (see :func:`radixlm.batch.future_token`). On CPU every op has
already run when ``launch`` returns; the same objects and calls are used, so CPU tests cover
the overlapped scheduling logic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from radixlm.outputs import StepResult


class PendingStep(Protocol):
    """What a runner's ``launch`` returns.

    Attributes:
        token_ids: [B] int64 (on the runner's device): the id each row of the launched batch
            samples, the source of the next step's placeholders; rows that do not sample hold 0.
    """

    token_ids: torch.Tensor

    def result(self) -> StepResult:
        """Wait for the step and return its results, row for row (idempotent)."""
        ...


class HostTransfer:
    """Device tensors copied to the host without blocking, with one event to wait on.

    On CUDA each tensor is copied into its own pinned buffer with ``non_blocking=True`` and an
    event is recorded behind the copies on the current stream, so :meth:`wait` waits for this
    step only, never for steps launched after it. Elsewhere the tensors are used as they are.

    Args:
        tensors: what to bring to the host (None entries stay None).
    """

    def __init__(self, tensors: list[torch.Tensor | None]):
        self._event = None
        self._host = [None if t is None else self._start_copy(t) for t in tensors]
        if any(t is not None and t.is_cuda for t in tensors):
            device = next(t.device for t in tensors if t is not None and t.is_cuda)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))

    @staticmethod
    def _start_copy(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_cuda:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def wait(self) -> list[list | None]:
        """Block until the copies have landed.

        Returns:
            Each tensor as (nested) Python lists, in the order given.
        """
        if self._event is not None:
            self._event.synchronize()
        return [None if t is None else t.tolist() for t in self._host]


class LaunchedStep:
    """A :class:`PendingStep` over a :class:`HostTransfer`.

    Args:
        token_ids: the batch's sampled ids on the device, one per row.
        transfer: the step's outputs on their way to the host.
        build: turns the transferred lists into the StepResult.
        started: ``time.perf_counter()`` at launch (for ``StepResult.forward_seconds``).
    """

    def __init__(self, token_ids: torch.Tensor, transfer: HostTransfer,
                 build: Callable[[list[list | None]], StepResult], started: float):
        self.token_ids = token_ids
        self._transfer = transfer
        self._build = build
        self._started = started
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        """Wait for the step (once) and return its results.

        Returns:
            One SeqStepResult per row of the launched batch.
        """
        if self._result is None:
            result = self._build(self._transfer.wait())
            result.forward_seconds = time.perf_counter() - self._started
            self._result = result
        return self._result

