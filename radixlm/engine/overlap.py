"""The step loop: schedule → launch → process, serially or overlapped one step deep.

Serial: each call schedules a batch, launches it, waits for its results and processes them.

Overlapped (``SchedulerConfig.enable_overlap``), one call does::

    schedule(t+1)  while step t runs on the device (t+1's decode rows feed placeholders for
                   the tokens step t samples; their K/V slots are already allocated)
    launch(t+1)    queued on the device behind t; placeholders resolved there, no host sync
    process(t)     wait for t's tokens, append them, advance grammars, stop checks, cache, free
    mask(t+1)      constrained rows only: start filling t+1's bitmask from the grammars (which
                   now hold t's tokens) on a background thread

and the next call, before it launches t+2, waits for that fill and queues t+1's masking and
sampling behind its forward pass (an unconstrained step queues its sampling at launch). So the
device never waits for the host's scheduling, bookkeeping or grammars: t+1's forward pass runs
while the host processes t, computes t+1's masks (llguidance computes them on its own threads
without the GIL) and, meanwhile, returns t's outputs and schedules t+2; the mask goes up
pinned and non-blocking, ordered on the stream, not by a host sync. Nothing touches a matcher
while its mask is being filled: only processing a step's results advances grammars, and a step
is processed only after its mask is committed. A call returns the outputs of step t.
Before scheduling, the loop processes step t first ("drains") when the next batch depends on
t's results on the host (``Scheduler.needs_results_before_next``: t was a prefill, or has
penalised rows, or the next decode needs a retraction). Requests that finish when t is
processed still have a row in t+1; the scheduler drops that row's result (the request's epoch
moved on) and its slot was freed with the request. Serially, a call schedules, launches, fills
the masks, then processes the same step.
"""

from __future__ import annotations

import logging
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from radixlm.batch import ScheduledBatch
from radixlm.executor.errors import RunnerDeadError
from radixlm.executor.pending import PendingStep
from radixlm.outputs import TokenOutput
from radixlm.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)


class Runner(Protocol):
    """What the loop needs from an executor (``ModelRunner`` or ``NullRunner``)."""

    def launch(self, batch: ScheduledBatch, futures: PendingStep | None = None) -> PendingStep:
        """Queue the batch's forward pass (and its sampling, unless it awaits a bitmask)."""
        ...


@dataclass
class InFlightStep:
    """A launched batch whose results have not been processed yet."""

    batch: ScheduledBatch
    pending: PendingStep
    # The bitmask fill under way on the loop's mask thread; its sampling is committed once
    # the fill is done (None: committed already, or nothing to fill).
    mask_fill: Future | None = None
    # Why the fill failed: the step then samples unmasked (the step after it may already
    # read its tokens) and its constrained rows are aborted with this message when it is
    # processed.
    mask_error: str | None = None


class StepLoop:
    """Drives the scheduler and a runner one step per call.

    Args:
        scheduler: builds batches and applies results.
        runner: launches batches (``launch(batch, futures) -> PendingStep``).
        overlap: schedule and launch step t+1 before processing step t.
    """

    def __init__(self, scheduler: Scheduler, runner: Runner, overlap: bool):
        self.scheduler = scheduler
        self.runner = runner
        self.overlap = overlap
        self.in_flight: InFlightStep | None = None
        self.steps_launched = 0
        self._mask_thread: ThreadPoolExecutor | None = None
        # Outputs of a step processed outside step() (a drain for flush_cache), returned next.
        self._held: list[TokenOutput] = []

    def has_work(self) -> bool:
        """Requests to run, a step in flight, or outputs not returned yet."""
        return bool(self.scheduler.has_work() or self.in_flight is not None or self._held)

    def only_waiting(self) -> bool:
        """Work exists, but only requests in the queue (e.g. waiting for a grammar)."""
        sched = self.scheduler
        busy = sched.running or sched.prefilling or self.in_flight is not None or self._held
        return sched.has_work() and not busy

    def step(self) -> list[TokenOutput]:
        """Schedule and launch one batch; process the previous one (overlap) or this one.

        Returns:
            The outputs of the step processed in this call (maybe none).
        """
        outputs, self._held = self._held, []
        if self.in_flight is not None and self._must_drain(self.in_flight):
            outputs += self._process(self._take_in_flight())
        previous = self._take_in_flight()
        batch = self.scheduler.schedule(previous.batch if previous is not None else None)
        if previous is not None and previous.mask_fill is not None:
            failed = self._finish_mask(previous)  # t+1 samples before t+2's forward is queued
            if failed:
                outputs += failed
                previous = None
        if batch is not None:
            outputs += self._launch(batch, previous)
        if previous is not None:
            outputs += self._process(previous)
        if self.in_flight is not None:
            outputs += self._start_mask(self.in_flight)
        if not self.overlap and self.in_flight is not None:
            outputs += self._process(self._take_in_flight())
        outputs += self.scheduler.take_pending_outputs()
        return outputs

    def drain(self) -> None:
        """Process the step in flight, if any; its outputs come with the next ``step()``."""
        if self.in_flight is not None:
            self._held += self._process(self._take_in_flight())

    def close(self) -> None:
        """Stop the mask thread (the step in flight, if any, is left as it is)."""
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=True)
            self._mask_thread = None

    def _must_drain(self, step: InFlightStep) -> bool:
        return not self.overlap or self.scheduler.needs_results_before_next(step.batch)

    def _take_in_flight(self) -> InFlightStep | None:
        step, self.in_flight = self.in_flight, None
        return step

    def _launch(self, batch: ScheduledBatch, previous: InFlightStep | None) -> list[TokenOutput]:
        futures = previous.pending if previous is not None else None
        try:
            pending = self.runner.launch(batch, futures)
        except RunnerDeadError:  # no batch can run any more: the engine stops
            raise
        except Exception as exc:  # a failing batch must not take the engine down
            logger.error("forward pass failed:\n%s", traceback.format_exc())
            return self._abort_rows(batch, f"internal error in the forward pass: {exc}")
        self.in_flight = InFlightStep(batch, pending)
        self.steps_launched += 1
        return []

    def _start_mask(self, step: InFlightStep) -> list[TokenOutput]:
        """Queue the launched step's sampling now when it has no bitmask; else start filling
        the bitmask on the mask thread (the sampling is queued by :meth:`_finish_mask`)."""
        if step.pending.bitmask is None:
            return self._commit(step)
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="mask-fill")
        try:  # the matchers are looked up here, on the scheduler's thread
            job = self.scheduler.bitmask_job(step.batch, step.pending.bitmask)
        except Exception as exc:  # a failure fails this batch only
            logger.error("masking failed:\n%s", traceback.format_exc())
            self.in_flight = None
            return self._abort_rows(step.batch, f"internal error in the forward pass: {exc}")
        step.mask_fill = self._mask_thread.submit(job)
        return []

    def _finish_mask(self, step: InFlightStep) -> list[TokenOutput]:
        """Wait for the step's bitmask fill and queue its masking and sampling. Returns the
        aborted rows' outputs if the sampling could not be queued (the step is then dropped),
        else nothing."""
        fill, step.mask_fill = step.mask_fill, None
        try:
            fill.result()
        except Exception as exc:  # a grammar failure fails this step's rows only
            logger.error("mask filling failed:\n%s", traceback.format_exc())
            step.mask_error = f"internal error in constrained decoding: {exc}"
            step.pending.bitmask.fill_(-1)
        return self._commit(step)

    def _commit(self, step: InFlightStep) -> list[TokenOutput]:
        try:
            step.pending.commit_mask()
        except RunnerDeadError:
            raise
        except Exception as exc:  # a grammar or sampling failure fails this batch only
            logger.error("masking or sampling failed:\n%s", traceback.format_exc())
            if self.in_flight is step:
                self.in_flight = None
            return self._abort_rows(step.batch, f"internal error in the forward pass: {exc}")
        return []

    def _process(self, step: InFlightStep) -> list[TokenOutput]:
        if step.mask_fill is not None:
            failed = self._finish_mask(step)
            if failed:
                return failed
        try:
            result = step.pending.result()
        except RunnerDeadError:
            raise
        except Exception as exc:  # errors of asynchronous device work surface here
            logger.error("forward pass failed:\n%s", traceback.format_exc())
            return self._abort_rows(step.batch, f"internal error in the forward pass: {exc}")
        outputs = []
        if step.mask_error is not None:
            # Only the constrained rows lose their token: aborting them moves their epochs on,
            # so processing drops their results and keeps the others'.
            constrained = [seq for seq in step.batch.seqs if seq.bitmask_row is not None]
            outputs = self._abort_rows(ScheduledBatch(step.batch.mode, constrained),
                                       step.mask_error)  # fmt: skip
        return outputs + self.scheduler.process(step.batch, result)

    def _abort_rows(self, batch: ScheduledBatch, message: str) -> list[TokenOutput]:
        outputs = []
        for seq in batch.seqs:
            out = self.scheduler.abort(seq.rid, message)
            if out is not None:
                outputs.append(out)
        return outputs
