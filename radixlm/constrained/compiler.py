"""GrammarCompiler: the public entry point, with an LRU cache and off-loop compilation.

Compiling can be slow (a large schema's token index) or never finish (pathological regexes),
so it never runs on the caller's thread: ``submit`` returns a future. The outlines backend
builds each index in a separate worker *process* with a wall-clock limit and an address-space
limit; a worker that runs out of time is killed (SIGKILL: Rust code does not poll signals) and
replaced, one that dies of memory exhaustion is replaced, and either way the future fails with
:class:`GrammarError` -- the caller's process never hangs and never crashes. llguidance (the
default) compiles in the lane thread without the GIL, bounded by its own fuel limits.

Identical constraints share one compile job; every ``submit`` gets its own future, so one
caller cancelling (a client that went away) detaches only that caller, and the job itself is
cancelled only when no caller is left. A slow job never makes a normal one wait: when jobs are
queued and every lane has been busy for ``_SLOW_S``, an extra lane starts (up to
``max_extra_lanes``), and a job past ``timeout_s`` fails with ``feature="timeout"`` at once.
"""

from __future__ import annotations

import json
import logging
import pickle
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from radixlm.constrained.base import Grammar
from radixlm.constrained.errors import GrammarError
from radixlm.constrained.index_build import KINDS, TokenTables
from radixlm.constrained.json_schema import JsonSchemaOptions
from radixlm.constrained.outlines_backend import OutlinesGrammar, TokenizerInfo
from radixlm.constrained.worker import WorkerProcess

log = logging.getLogger(__name__)
BACKENDS = ("llguidance", "outlines")
_SLOW_S = 0.05  # a lane busy this long with jobs waiting counts as held up
_EXTRA_IDLE_S = 5.0  # an extra lane exits after this long without work


@dataclass(eq=False)
class _Job:
    """One compilation, shared by every caller that submitted the same constraint."""

    key: tuple
    kind: str
    spec: Any
    future: Future = field(default_factory=Future)  # the job's own; callers get handles
    waiters: int = 0
    started: float | None = None  # monotonic time a lane took it


class GrammarCompiler:
    """Compiles constraints into :class:`Grammar` objects for one tokenizer.

    Args:
        tokenizer: any Hugging Face tokenizer.
        backend: "outlines" (radixlm's schema compiler + outlines-core index) or "llguidance".
        vocab_size: the model's logits width (>= the tokenizer's size); masks are this wide
            and ids past the tokenizer's size are never allowed.
        eos_token_ids: ids allowed where the grammar is complete (default: the tokenizer's EOS).
        timeout_s: wall-clock limit of one compilation.
        max_workers: lanes always running (compilations at once when none is slow).
        max_extra_lanes: lanes started on demand while every lane is held up by a slow job.
        memory_limit_mb: address-space limit of each compile worker process (outlines).
        cache_size: compiled grammars kept (LRU).
        json_options: the schema compiler's options (whitespace policy, bounds, strictness).
        isolate: run outlines index builds in worker processes (False: in threads, with no
            hard time limit; for tests that measure the compiler itself).
    """

    def __init__(
        self,
        tokenizer: Any,
        backend: str = "llguidance",
        vocab_size: int | None = None,
        *,
        eos_token_ids: list[int] | None = None,
        timeout_s: float = 10.0,
        max_workers: int = 2,
        memory_limit_mb: int = 4096,
        cache_size: int = 256,
        json_options: JsonSchemaOptions | None = None,
        isolate: bool = True,
        max_extra_lanes: int = 4,
    ):
        if backend not in BACKENDS:
            raise GrammarError(
                f"unknown grammar backend {backend!r} (one of {BACKENDS})", feature="backend"
            )
        self.backend = backend
        self.timeout_s = timeout_s
        self.json_options = json_options or JsonSchemaOptions()
        self.info = TokenizerInfo(tokenizer, vocab_size, eos_token_ids)
        self._cache: OrderedDict[tuple, _Job] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.RLock()  # cancelling a job runs callbacks that take it
        self._jobs: queue.Queue = queue.Queue()
        self._closed = False
        self._llg = None
        self._vocab_blob: bytes | None = None
        self._tables: TokenTables | None = None
        if backend == "llguidance":
            self.llguidance()  # the LLTokenizer takes ~1 s: pay it here, not in a compile
        self._isolate = isolate
        self._memory_limit_mb = memory_limit_mb
        self._max_lanes = max_workers + max_extra_lanes
        self._lanes_started = 0
        self._runners: list[_Runner] = []
        self._wake = threading.Event()
        for _ in range(max_workers):
            self._add_lane(permanent=True)
        self._monitor = threading.Thread(
            target=self._watch, name="grammar-compile-watch", daemon=True
        )
        self._monitor.start()

    # ---- public API ----

    @property
    def vocab_size(self) -> int:
        """Mask width in tokens (the model's logits width)."""
        return self.info.vocab_size

    @property
    def words(self) -> int:
        """Int32 words per bitmask row: ``ceil(vocab_size / 32)``."""
        return self.info.words

    def compile_json_schema(self, schema: Any) -> Grammar:
        """Compile a JSON schema (dict, bool or JSON text). Raises GrammarError."""
        return self._wait(self.submit("json_schema", schema))

    def compile_json_object(self) -> Grammar:
        """Any JSON object (``response_format: json_object``)."""
        return self._wait(self.submit("json_object", None))

    def compile_regex(self, pattern: str) -> Grammar:
        """Compile a regex the whole output must match (Python ``re`` syntax)."""
        return self._wait(self.submit("regex", pattern))

    def compile_choices(self, choices: list[str]) -> Grammar:
        """The output is exactly one of ``choices``."""
        return self._wait(self.submit("choices", list(choices)))

    def compile_lark(self, grammar: str) -> Grammar:
        """A context-free grammar in llguidance's Lark syntax (EBNF; ``%json {...}`` embeds a
        JSON schema). llguidance backend only."""
        return self._wait(self.submit("lark", grammar))

    def submit(self, kind: str, spec: Any) -> Future:
        """Compile off the caller's thread.

        Args:
            kind: "json_schema", "regex", "choices", "json_object" or (llguidance) "lark".
            spec: the schema / pattern / list of choices (ignored for json_object).

        Returns:
            A future resolving to a :class:`Grammar`, or failing with :class:`GrammarError`
            (invalid spec, unsupported feature, time or memory limit). Identical requests share
            one compile job (LRU cache keyed by backend, kind, spec and tokenizer) but each gets
            its own future: cancelling it detaches this caller only, and the job is cancelled
            when its last caller is gone.
        """
        if self._closed:
            raise RuntimeError("GrammarCompiler is closed")
        try:
            key = self._cache_key(kind, spec)
        except GrammarError as exc:
            return _failed(exc)
        with self._lock:
            job = self._cache.get(key)
            if job is None or job.future.cancelled():
                job = _Job(key, kind, spec)
                self._cache[key] = job
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
                self._jobs.put(job)
                self._wake.set()
            else:
                self._cache.move_to_end(key)
            job.waiters += 1
        handle: Future = Future()
        handle.add_done_callback(lambda h: self._detach(job, h))
        job.future.add_done_callback(lambda f: _settle(handle, f))
        return handle

    def _detach(self, job: _Job, handle: Future) -> None:
        """A caller's future finished or was cancelled: cancel the job if nobody waits."""
        if not handle.cancelled():
            return
        with self._lock:
            job.waiters -= 1
            if job.waiters > 0 or job.future.done():
                return
            # a job not started yet is dropped; a running one finishes and stays cached
            if job.future.cancel() and self._cache.get(job.key) is job:
                del self._cache[job.key]

    def close(self) -> None:
        """Stop the lanes and their workers."""
        self._closed = True
        self._wake.set()
        with self._lock:
            runners = list(self._runners)
        for runner in runners:
            runner.stop()

    def __enter__(self) -> GrammarCompiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals ----

    def _wait(self, future: Future) -> Grammar:
        return future.result()

    def _cache_key(self, kind: str, spec: Any) -> tuple:
        kinds = KINDS + ("lark",) if self.backend == "llguidance" else KINDS
        if kind == "lark" and self.backend != "llguidance":
            raise GrammarError(
                "EBNF/Lark grammars need the llguidance grammar backend (--grammar-backend "
                f"llguidance); this compiler uses {self.backend}",
                feature="kind",
            )
        if kind not in kinds:
            raise GrammarError(
                f"unknown constraint kind {kind!r} for the {self.backend} backend (one of {kinds})",
                feature="kind",
            )
        if kind == "lark" and not isinstance(spec, str):
            raise GrammarError("a Lark grammar must be a string", feature="lark")
        if kind == "json_schema":
            spec = _schema_text(spec)
        elif kind == "choices":
            spec = tuple(spec) if isinstance(spec, (list, tuple)) else spec
        elif kind == "json_object":
            spec = None
        return (self.backend, kind, spec, self.info.vocab.fingerprint, self.info.vocab_size)

    def vocab_blob(self) -> bytes:
        """What a worker process needs to build its :class:`TokenTables` (pickled once)."""
        with self._lock:
            if self._vocab_blob is None:
                self._vocab_blob = pickle.dumps((self.info.vocab.token_bytes, self.info.fake.base))
            return self._vocab_blob

    def token_tables(self) -> TokenTables:
        """Tables for in-thread builds (``isolate=False``), built once."""
        with self._lock:
            if self._tables is None:
                self._tables = TokenTables(self.info.vocab.token_bytes, self.info.fake)
            return self._tables

    def llguidance(self):
        with self._lock:
            if self._llg is None:
                from radixlm.constrained.llguidance_backend import LLGuidanceCompiler

                self._llg = LLGuidanceCompiler(self.info, self.json_options)
            return self._llg

    def forget(self, job: _Job) -> None:
        """Drop a failed-for-resource-reasons entry so a later submit retries."""
        with self._lock:
            if self._cache.get(job.key) is job:
                del self._cache[job.key]

    def next_job(self, runner: _Runner) -> _Job | None:
        """The next job for ``runner``; None when it should exit (closed, or an idle extra)."""
        while not self._closed and not runner.stopped:
            try:
                job = self._jobs.get(timeout=None if runner.permanent else _EXTRA_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._runners.remove(runner)
                        return None
                continue
            if job is None:
                return None
            if job.future.set_running_or_notify_cancel():
                job.started = time.monotonic()
                self._wake.set()  # the watcher times running jobs
                return job
        return None

    def _add_lane(self, permanent: bool) -> None:
        runner = _Runner(self, self._lanes_started, self._isolate, self._memory_limit_mb, permanent)
        self._lanes_started += 1
        self._runners.append(runner)
        runner.start()

    def _watch(self) -> None:
        """Fail jobs past the time limit; add a lane while queued jobs wait behind slow ones."""
        idle = False
        while not self._closed:
            self._wake.wait(None if idle else _SLOW_S / 2)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                busy = [r for r in self._runners if r.job is not None]
                idle = not busy and self._jobs.empty()
                # a worker process is killed by its own lane at timeout_s (its start-up does
                # not count); an llguidance build cannot be: fail its callers, abandon the lane
                # (outlines with isolate=False, for tests, has no time limit)
                for runner in busy if self.backend == "llguidance" else ():
                    job = runner.job
                    if job is None or job.started is None:
                        continue
                    if now - job.started > self.timeout_s and not job.future.done():
                        _set_exception(
                            job.future,
                            GrammarError(
                                f"grammar compilation timed out after {self.timeout_s:g} s",
                                feature="timeout",
                            ),
                        )
                        self.forget(job)
                        runner.abandoned = True
                held = all(r.abandoned or _busy_for(r) > _SLOW_S for r in self._runners)
                if (
                    held
                    and not self._jobs.empty()
                    and not self._closed
                    and sum(not r.abandoned for r in self._runners) < self._max_lanes
                ):
                    self._add_lane(permanent=False)

    def finish(self, payload_or_grammar: Any) -> Grammar:
        """Turn a worker payload into a ready grammar (first masks warmed)."""
        grammar = payload_or_grammar
        if not isinstance(grammar, Grammar):
            grammar = OutlinesGrammar(self.info, payload_or_grammar)
            self.info.content  # noqa: B018 - build the string tables off the scheduling loop
            grammar.mask(grammar.initial_state)
        return grammar


class _Runner:
    """One compile lane: a thread feeding jobs to its own worker process (or running them)."""

    def __init__(
        self,
        owner: GrammarCompiler,
        number: int,
        isolate: bool,
        memory_limit_mb: int,
        permanent: bool = True,
    ):
        self.owner = owner
        self.isolate = isolate
        self.memory_limit_mb = memory_limit_mb
        self.permanent = permanent
        self.worker: WorkerProcess | None = None
        self.job: _Job | None = None
        self.stopped = False
        self.abandoned = False  # its job overran the time limit and was failed without it
        self.thread = threading.Thread(
            target=self._loop, name=f"grammar-compile-{number}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.owner._jobs.put(None)
        if self.worker is not None:
            self.worker.kill()

    def _loop(self) -> None:
        try:
            while not self.abandoned:
                job = self.owner.next_job(self)
                if job is None:
                    return
                self.job = job
                try:
                    self._run(job)
                finally:
                    self.job = None
        finally:
            if self.worker is not None:
                self.worker.kill()
            with self.owner._lock:
                if self in self.owner._runners:
                    self.owner._runners.remove(self)
                    if self.permanent and not self.owner._closed:
                        self.owner._add_lane(permanent=True)  # an abandoned lane's stand-in

    def _run(self, job: _Job) -> None:
        future = job.future
        try:
            cpu = time.thread_time()
            grammar = self.owner.finish(self._compile(job.kind, job.spec))
            if self.owner.backend == "llguidance" or not self.isolate:
                grammar.compile_cpu_s = time.thread_time() - cpu
            _set_result(future, grammar)
        except GrammarError as exc:
            if exc.feature in ("timeout", "memory", "crash"):
                self.owner.forget(job)
            _set_exception(future, exc)
        except Exception as exc:  # a bug must fail one request, not the lane
            log.exception("grammar compilation failed")
            self.owner.forget(job)
            _set_exception(
                future, GrammarError(f"grammar compilation failed: {exc!r}", feature="crash")
            )

    def _compile(self, kind: str, spec: Any) -> Any:
        owner = self.owner
        if owner.backend == "llguidance":
            return owner.llguidance().build(kind, spec)
        if not self.isolate:
            from radixlm.constrained.index_build import build_index

            return build_index(
                kind, spec, owner.json_options, owner.info.vocab.dummy_prefix, owner.token_tables()
            )
        if self.worker is None or not self.worker.alive():
            self.worker = WorkerProcess(
                owner.vocab_blob(),
                owner.json_options,
                owner.info.vocab.dummy_prefix,
                self.memory_limit_mb,
            )
        started = time.monotonic()
        try:
            return self.worker.run(kind, spec, owner.timeout_s)
        finally:
            log.debug("compiled %s in %.3fs", kind, time.monotonic() - started)


def _busy_for(runner: _Runner) -> float:
    """Seconds the lane has spent on its current job (0 when idle); reads ``job`` once, as
    the lane clears it concurrently."""
    job = runner.job
    started = job.started if job is not None else None
    return 0.0 if started is None else time.monotonic() - started


def _set_result(future: Future, value: Any) -> None:
    try:
        future.set_result(value)
    except InvalidStateError:  # already failed by the time limit, or cancelled
        pass


def _set_exception(future: Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except InvalidStateError:
        pass


def _settle(handle: Future, job_future: Future) -> None:
    """Copy the job's outcome to one caller's future (unless that caller cancelled)."""
    if job_future.cancelled():
        handle.cancel()
    elif job_future.exception() is not None:
        _set_exception(handle, job_future.exception())
    else:
        _set_result(handle, job_future.result())


def _schema_text(spec: Any) -> str:
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise GrammarError(f"JSON schema is not valid JSON: {exc}", feature="json") from None
    try:
        return json.dumps(spec, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"JSON schema is not serializable: {exc}", feature="json") from None


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future
