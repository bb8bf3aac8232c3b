"""Runs engine requests for the HTTP handlers: fan-out, streaming merge, aborts, bookkeeping.

Every HTTP request becomes one or more engine requests ("jobs"), each a single prompt with
``n == 1`` and its own request id, so that any of them can be aborted on its own: when the client
disconnects, when a sibling is rejected, when its deadline passes, or when the server drains.
A request's jobs are listed by the request itself (``Job.group``); ids are matched exactly,
never by prefix.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from radixlm.server.errors import APIError
from radixlm.server.metrics import ServerMetrics

logger = logging.getLogger("radixlm.server")
_END = object()
# After an abort, how long to wait for the engine to deliver the aborted request's final result.
ABORT_GRACE_S = 5.0


def new_rid(prefix: str = "") -> str:
    """A fresh request id."""
    return f"{prefix}{uuid.uuid4().hex}"


@dataclass
class Job:
    """One engine request.

    Attributes:
        rid: engine request id (unique).
        group: the id the client knows (``/abort`` with it aborts every job of the request).
        args: keyword arguments for ``engine.async_generate`` besides ``rid`` and ``stream``.
        timer: the request's deadline (``--request-timeout``), cancelled when it finishes.
    """

    rid: str
    group: str
    args: dict[str, Any] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = field(default=None, repr=False, compare=False)


class Inflight:
    """Engine request ids currently running, grouped by the id the client knows.

    A rid belongs to the job that claimed it: two requests sent at once with the same ``rid``
    both pass the route's check, and the loser must neither release nor abort the winner's.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def claim(self, job: Job) -> None:
        """Take ``job.rid`` for ``job``.

        Raises:
            APIError: 400, another running job holds the rid.
        """
        holder = self._jobs.setdefault(job.rid, job)
        if holder is not job:
            raise APIError(400, f"request id {job.rid!r} is already in use", "rid")

    def holds(self, job: Job) -> bool:
        return self._jobs.get(job.rid) is job

    def discard(self, job: Job) -> None:
        """Release ``job.rid`` if ``job`` holds it."""
        if self.holds(job):
            del self._jobs[job.rid]

    def rids(self, group: str | None = None) -> list[str]:
        """Running engine ids: all of them, or those of the request the client knows as
        ``group``, or the one job whose engine id is exactly ``group``."""
        if group is None:
            return list(self._jobs)
        return [rid for rid, job in self._jobs.items() if group in (job.group, rid)]

    def admit(self, jobs: list[Job]) -> None:
        """Claim every job's rid, or none of them.

        Raises:
            APIError: 400, a rid is held by another running job.
        """
        claimed: list[Job] = []
        try:
            for job in jobs:
                self.claim(job)
                claimed.append(job)
        except APIError:
            for job in claimed:
                self.discard(job)
            raise

    def __len__(self) -> int:
        return len(self._jobs)


class Runner:
    """Submits jobs to the engine and keeps metrics and the in-flight table current.

    Args:
        engine: a radixlm Engine (its async API is used; nothing here blocks the event loop).
        metrics: where finished requests are recorded.
        inflight: the server's table of running requests.
        capacity: most engine requests in flight (running + queued); beyond it a request is
            answered 429.
        retry_after: seconds a refused client is told to wait (``Retry-After``).
        request_timeout: seconds a request may run before its jobs are aborted (None: never).
    """

    def __init__(self, engine: Any, metrics: ServerMetrics, inflight: Inflight,
                 capacity: int | None = None, retry_after: int = 1,
                 request_timeout: float | None = None):
        self.engine = engine
        self.metrics = metrics
        self.inflight = inflight
        self.capacity = capacity
        self.retry_after = retry_after
        self.request_timeout = request_timeout

    def admit(self, jobs: list[Job]) -> None:
        """Take the jobs' rids if the queue has room for all of them.

        Raises:
            APIError: 429 (with ``Retry-After``) when the queue is full; 400 for a rid in use.
        """
        if self.capacity is not None and len(self.inflight) + len(jobs) > self.capacity:
            raise APIError(429, f"the server is busy: {len(self.inflight)} requests in flight, "
                                f"room for {self.capacity}; retry later", code="queue_full",
                           headers={"Retry-After": str(self.retry_after)})
        self.inflight.admit(jobs)

    def abort_held(self, jobs: list[Job], message: str = "aborted by the client") -> None:
        """Abort the jobs that hold their rid (a job that lost its rid to another is not ours)."""
        self.abort([job.rid for job in jobs if self.inflight.holds(job)], message)

    def abort(self, rids: list[str], message: str = "aborted by the client") -> None:
        """Abort engine requests (finished or unknown ids are ignored by the engine)."""
        for rid in rids:
            try:
                self.engine.abort(rid, message)
            except Exception:  # an abort must never take the server down with it
                logger.exception("abort of %s failed", rid)

    def _deadline(self, jobs: list[Job]) -> asyncio.TimerHandle | None:
        """Arm ``request_timeout``: when it passes, the jobs still running are aborted (their
        results come back with finish_reason ``abort`` and what they generated so far)."""
        if self.request_timeout is None:
            return None
        message = f"aborted: the request ran past the server's {self.request_timeout:g} s " \
                  "limit (--request-timeout)"
        return asyncio.get_running_loop().call_later(self.request_timeout, self.abort_held,
                                                     jobs, message)

    # ---- whole results --------------------------------------------------------------------

    async def collect(self, jobs: list[Job], request: Request | None) -> list[dict[str, Any]]:
        """Run jobs concurrently and return their results in job order.

        If any job is rejected the others are aborted and the error is raised; if the client
        disconnects first every job is aborted.

        Args:
            jobs: the engine requests.
            request: the HTTP request, watched for a client disconnect (None: not watched).

        Returns:
            One engine result dict per job.
        """
        self.admit(jobs)
        tasks = [asyncio.create_task(self._run_one(job)) for job in jobs]
        watcher = asyncio.create_task(_wait_disconnect(request))
        deadline = self._deadline(jobs)
        try:
            await self._wait_all(tasks, watcher, jobs)
        except asyncio.CancelledError:  # the server gave up on this request (drain timeout)
            self.abort_held(jobs)
            for task in tasks:
                task.cancel()
            raise
        finally:
            watcher.cancel()
            if deadline is not None:
                deadline.cancel()
            for job in jobs:
                self.inflight.discard(job)
        return [task.result() for task in tasks]

    async def _wait_all(self, tasks: list[asyncio.Task], watcher: asyncio.Task,
                        jobs: list[Job]) -> None:
        pending: set[asyncio.Task] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {watcher},
                                               return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                pending.discard(watcher)
                await self._abandon(jobs, pending)
                raise APIError(499, "client disconnected")
            pending.discard(watcher)
            failed = next((t for t in done if t.exception() is not None), None)
            if failed is not None:
                await self._abandon(jobs, pending)
                raise failed.exception()

    async def _abandon(self, jobs: list[Job], pending: set[asyncio.Task]) -> None:
        self.abort_held(jobs)
        if pending:
            _, still = await asyncio.wait(pending, timeout=ABORT_GRACE_S)
            for task in still:
                task.cancel()

    async def _run_one(self, job: Job) -> dict[str, Any]:
        try:
            result = await self.engine.async_generate(**job.args, rid=job.rid)
        finally:
            self.inflight.discard(job)
        self.metrics.observe_result(result)
        return result

    # ---- streams --------------------------------------------------------------------------

    async def open_streams(self, jobs: list[Job], request: Request | None
                           ) -> list[AsyncIterator[dict[str, Any]]]:
        """Submit every job with ``stream=True`` and wait for each one's first chunk.

        Waiting for the first chunk lets a request the engine rejects late (an invalid grammar)
        still get a plain HTTP error instead of a stream that fails.

        Returns:
            One async iterator per job, starting with that first chunk.

        Raises:
            Exception: the first rejection (RequestError, QueueFullError...), after aborting
                the jobs already submitted; APIError 499 when the client disconnects first.
        """
        self.admit(jobs)
        streams = await self._submit_streams(jobs)
        firsts = [asyncio.create_task(_first(stream)) for stream in streams]
        watcher = asyncio.create_task(_wait_disconnect(request))
        timer = self._deadline(jobs)
        try:
            await self._wait_all(firsts, watcher, jobs)
        except BaseException:
            if timer is not None:
                timer.cancel()
            for job in jobs:
                self.inflight.discard(job)
            raise
        finally:
            watcher.cancel()
        for job in jobs:
            job.timer = timer
        return [_prepend(task.result(), stream) for task, stream in zip(firsts, streams)]

    async def _submit_streams(self, jobs: list[Job]) -> list[AsyncIterator[dict[str, Any]]]:
        streams: list[AsyncIterator[dict[str, Any]]] = []
        for index, job in enumerate(jobs):
            try:
                streams.append(await self.engine.async_generate(**job.args, rid=job.rid,
                                                                stream=True))
            except BaseException:
                self.abort_held(jobs[:index])
                for j in jobs:
                    self.inflight.discard(j)
                raise
        return streams

    async def merge(self, jobs: list[Job], streams: list[AsyncIterator[dict[str, Any]]]
                    ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Interleave the chunks of several streams as ``(job index, chunk)``, in arrival order.

        Closing the returned generator early (a client disconnect) aborts every unfinished job.
        """
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams)]
        unfinished = {i for i in range(len(jobs))}
        try:
            while unfinished:
                index, chunk = await queue.get()
                if chunk is _END:
                    unfinished.discard(index)
                    self.inflight.discard(jobs[index])
                    continue
                if isinstance(chunk, BaseException):
                    raise chunk
                if chunk["meta_info"].get("finish_reason") is not None:
                    self.metrics.observe_result(chunk)
                yield index, chunk
        finally:
            self._close_streams(jobs, unfinished, pumps)

    def _close_streams(self, jobs: list[Job], unfinished: set[int],
                       pumps: list[asyncio.Task]) -> None:
        if jobs and jobs[0].timer is not None:
            jobs[0].timer.cancel()
        self.abort_held([jobs[i] for i in unfinished])
        for i in unfinished:
            self.inflight.discard(jobs[i])
        for pump in pumps:
            pump.cancel()


async def _first(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    return await anext(stream, None)


async def _prepend(first: dict[str, Any] | None, stream: AsyncIterator[dict[str, Any]]
                   ) -> AsyncIterator[dict[str, Any]]:
    if first is not None:
        yield first
    async for chunk in stream:
        yield chunk


async def _pump(index: int, stream: AsyncIterator[dict[str, Any]], queue: asyncio.Queue) -> None:
    try:
        async for chunk in stream:
            queue.put_nowait((index, chunk))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # delivered to the consumer, which re-raises it
        queue.put_nowait((index, exc))
    queue.put_nowait((index, _END))


async def _wait_disconnect(request: Request | None) -> None:
    """Return when the client closes the connection (never, for ``None``)."""
    if request is None:
        await asyncio.Event().wait()
        return
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
