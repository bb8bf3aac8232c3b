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

    A batch with constrained rows (``ScheduledBatch.num_mask_rows``) is launched without its
    bitmask: the forward pass is queued at once, :attr:`bitmask` is a host buffer for the
    masks, and :meth:`commit_mask` queues the mask upload, masking and sampling behind the
    forward. The loop fills the masks in between, while the device computes the forward, once
    the grammars have taken the previous step's tokens.

    Attributes:
        token_ids: [B] int64 (on the runner's device): the id each row of the launched batch
            samples, the source of the next step's placeholders; rows that do not sample hold 0.
            Available once the mask is committed (at once for a batch without mask rows).
        bitmask: int32 ``[num_mask_rows, ceil(vocab / 32)]`` host buffer to fill before
            :meth:`commit_mask`, or None when the batch has no constrained rows.
    """

    token_ids: torch.Tensor
    bitmask: torch.Tensor | None

    def commit_mask(self) -> None:
        """Queue the sampling behind the forward pass, masked by :attr:`bitmask` (idempotent;
        a no-op without mask rows)."""
        ...

    def result(self) -> StepResult:
        """Wait for the step and return its results, row for row (idempotent)."""
        ...


class HostMaskBuffers:
    """Reused host buffers for step bitmasks (pinned on CUDA), handed out in turn.

    A buffer is refilled two launches later, after the loop has waited for the step between,
    whose results come behind the upload of this one, so an upload never reads a buffer being
    refilled.

    Args:
        pinned: allocate page-locked memory (for asynchronous uploads).
        count: buffers in the rotation.
    """

    def __init__(self, pinned: bool, count: int = 2):
        self.pinned = pinned
        self._buffers: list[torch.Tensor | None] = [None] * count
        self._next = 0

    def take(self, rows: int, words: int) -> torch.Tensor:
        """A ``[rows, words]`` int32 host buffer (contents undefined)."""
        i, self._next = self._next, (self._next + 1) % len(self._buffers)
        buf = self._buffers[i]
        if buf is None or buf.shape[0] < rows or buf.shape[1] != words:
            size = max(rows, 2 * buf.shape[0] if buf is not None else 0, 8)
            # launch runs in inference mode; the host writes the masks outside it
            with torch.inference_mode(False):
                buf = torch.empty((size, words), dtype=torch.int32, pin_memory=self.pinned)
            self._buffers[i] = buf
        return buf[:rows]


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
    """A :class:`PendingStep` whose forward pass is queued; its sampling is queued by
    :meth:`commit_mask` (at once when there is no bitmask to fill).

    Args:
        sample: queues masking, sampling and the copies to the host given the filled host
            bitmask (or None); returns the sampled ids on the device and their transfer.
        build: turns the transferred lists into the StepResult.
        started: ``time.perf_counter()`` at launch (for ``StepResult.forward_seconds``).
        bitmask: the host buffer to fill before :meth:`commit_mask`, or None.
    """

    def __init__(
        self,
        sample: Callable[[torch.Tensor | None], tuple[torch.Tensor, HostTransfer]],
        build: Callable[[list[list | None]], StepResult],
        started: float,
        bitmask: torch.Tensor | None = None,
    ):
        self.bitmask = bitmask
        self._sample = sample
        self._build = build
        self._started = started
        self._token_ids: torch.Tensor | None = None
        self._transfer: HostTransfer | None = None
        self._result: StepResult | None = None
        if bitmask is None:
            self.commit_mask()

    @property
    def token_ids(self) -> torch.Tensor:
        if self._token_ids is None:
            raise RuntimeError("the step's bitmask was not committed: nothing is sampled yet")
        return self._token_ids

    def commit_mask(self) -> None:
        """Queue masking, sampling and the copies to the host (once)."""
        if self._transfer is None:
            self._token_ids, self._transfer = self._sample(self.bitmask)
            self._sample = None  # drop the logits it holds

    def result(self) -> StepResult:
        """Wait for the step (once) and return its results.

        Returns:
            One SeqStepResult per row of the launched batch.
        """
        if self._result is None:
            if self._transfer is None:
                raise RuntimeError("result() before commit_mask(): the step never sampled")
            result = self._build(self._transfer.wait())
            result.forward_seconds = time.perf_counter() - self._started
            self._result = result
        return self._result
