"""GrammarCompiler: the public entry point, with an LRU cache and off-loop compilation.

Compiling can be slow (a large schema's token index) or never finish (pathological regexes),
so it never runs on the caller's thread: ``submit`` returns a future. The default backend
builds each index in a separate worker *process* with a wall-clock limit and an address-space
limit; a worker that runs out of time is killed (SIGKILL: Rust code does not poll signals) and
replaced, one that dies of memory exhaustion is replaced, and either way the future fails with
:class:`GrammarError` -- the caller's process never hangs and never crashes.
"""

from __future__ import annotations

import json
import logging
import pickle
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from radixlm.constrained.base import Grammar
from radixlm.constrained.errors import GrammarError
from radixlm.constrained.index_build import KINDS, TokenTables
from radixlm.constrained.json_schema import JsonSchemaOptions
from radixlm.constrained.outlines_backend import OutlinesGrammar, TokenizerInfo
from radixlm.constrained.worker import WorkerProcess

log = logging.getLogger(__name__)
BACKENDS = ("outlines", "llguidance")


class GrammarCompiler:
    """Compiles constraints into :class:`Grammar` objects for one tokenizer.

    Args:
        tokenizer: any Hugging Face tokenizer.
        backend: "outlines" (radixlm's schema compiler + outlines-core index) or "llguidance".
        vocab_size: the model's logits width (>= the tokenizer's size); masks are this wide
            and ids past the tokenizer's size are never allowed.
        eos_token_ids: ids allowed where the grammar is complete (default: the tokenizer's EOS).
        timeout_s: wall-clock limit of one compilation.
        max_workers: compilations running at once.
        memory_limit_mb: address-space limit of each compile worker process (outlines).
        cache_size: compiled grammars kept (LRU).
        json_options: the schema compiler's options (whitespace policy, bounds, strictness).
        isolate: run outlines index builds in worker processes (False: in threads, with no
            hard time limit; for tests that measure the compiler itself).
    """

    def __init__(self, tokenizer: Any, backend: str = "outlines", vocab_size: int | None = None,
                 *, eos_token_ids: list[int] | None = None, timeout_s: float = 10.0,
                 max_workers: int = 2, memory_limit_mb: int = 4096, cache_size: int = 256,
                 json_options: JsonSchemaOptions | None = None, isolate: bool = True):
        if backend not in BACKENDS:
            raise GrammarError(f"unknown grammar backend {backend!r} (one of {BACKENDS})",
                               feature="backend")
        self.backend = backend
        self.timeout_s = timeout_s
        self.json_options = json_options or JsonSchemaOptions()
        self.info = TokenizerInfo(tokenizer, vocab_size, eos_token_ids)
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._closed = False
        self._llg = None
        self._vocab_blob: bytes | None = None
        self._tables: TokenTables | None = None
        if backend == "llguidance":
            self.llguidance()  # the LLTokenizer takes ~1 s: pay it here, not in a compile
        self._runners = [_Runner(self, i, isolate, memory_limit_mb) for i in range(max_workers)]

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

    def submit(self, kind: str, spec: Any) -> Future:
        """Compile off the caller's thread.

        Args:
            kind: "json_schema", "regex", "choices" or "json_object".
            spec: the schema / pattern / list of choices (ignored for json_object).

        Returns:
            A future resolving to a :class:`Grammar`, or failing with :class:`GrammarError`
            (invalid spec, unsupported feature, time or memory limit). Identical requests share
            one future (LRU cache keyed by backend, kind, spec and tokenizer).
        """
        if self._closed:
            raise RuntimeError("GrammarCompiler is closed")
        try:
            key = self._cache_key(kind, spec)
        except GrammarError as exc:
            return _failed(exc)
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not future.cancelled():
                self._cache.move_to_end(key)
                return future
            future = Future()
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._jobs.put((key, kind, spec, future))
        return future

    def close(self) -> None:
        """Stop the workers (pending futures fail)."""
        self._closed = True
        for runner in self._runners:
            runner.stop()

    def __enter__(self) -> GrammarCompiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals ----

    def _wait(self, future: Future) -> Grammar:
        return future.result()

    def _cache_key(self, kind: str, spec: Any) -> tuple:
        if kind not in KINDS:
            raise GrammarError(f"unknown constraint kind {kind!r} (one of {KINDS})",
                               feature="kind")
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
                self._vocab_blob = pickle.dumps((self.info.vocab.token_bytes,
                                                 self.info.fake.base))
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

    def forget(self, key: tuple, future: Future) -> None:
        """Drop a failed-for-resource-reasons entry so a later submit retries."""
        with self._lock:
            if self._cache.get(key) is future:
                del self._cache[key]

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

    def __init__(self, owner: GrammarCompiler, number: int, isolate: bool, memory_limit_mb: int):
        self.owner = owner
        self.isolate = isolate
        self.memory_limit_mb = memory_limit_mb
        self.worker: WorkerProcess | None = None
        self._stopped = False
        self.thread = threading.Thread(target=self._loop, name=f"grammar-compile-{number}",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stopped = True
        self.owner._jobs.put(None)
        if self.worker is not None:
            self.worker.kill()

    def _loop(self) -> None:
        while not self._stopped:
            job = self.owner._jobs.get()
            if job is None:
                return
            key, kind, spec, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.owner.finish(self._compile(kind, spec)))
            except GrammarError as exc:
                if exc.feature in ("timeout", "memory", "crash"):
                    self.owner.forget(key, future)
                future.set_exception(exc)
            except Exception as exc:  # a bug must fail one request, not the lane
                log.exception("grammar compilation failed")
                self.owner.forget(key, future)
                future.set_exception(GrammarError(f"grammar compilation failed: {exc!r}",
                                                  feature="crash"))

    def _compile(self, kind: str, spec: Any) -> Any:
        owner = self.owner
        if owner.backend == "llguidance":
            return owner.llguidance().build(kind, spec)
        if not self.isolate:
            from radixlm.constrained.index_build import build_index

            return build_index(kind, spec, owner.json_options, owner.info.vocab.dummy_prefix,
                               owner.token_tables())
        if self.worker is None or not self.worker.alive():
            self.worker = WorkerProcess(owner.vocab_blob(), owner.json_options,
                                        owner.info.vocab.dummy_prefix, self.memory_limit_mb)
        started = time.monotonic()
        try:
            return self.worker.run(kind, spec, owner.timeout_s)
        finally:
            log.debug("compiled %s in %.3fs", kind, time.monotonic() - started)


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
