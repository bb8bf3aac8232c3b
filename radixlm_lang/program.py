"""``@function``: a program, and how it is run, batched, traced and compiled."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from radixlm_lang import ir
from radixlm_lang.api import get_default_backend
from radixlm_lang.backends.base import Backend
from radixlm_lang.global_config import global_config
from radixlm_lang.graph import RequestGraph, hoistable_prefix
from radixlm_lang.interpreter import ExecutionOptions, StreamExecutor
from radixlm_lang.sampling import SamplingParams
from radixlm_lang.state import ProgramState
from radixlm_lang.tracer import trace_program


class _Running(threading.local):
    """The backends of the program bodies this thread is inside, innermost last (None while
    tracing). Inside a body, a program called without a state becomes a :class:`ProgramCall`."""

    def __init__(self) -> None:
        self.backends: list[Any] = []


_running = _Running()


@contextlib.contextmanager
def program_body(backend: Any) -> Iterator[None]:
    """Mark this thread as running a program's body on ``backend`` (runs and the tracer)."""
    _running.backends.append(backend)
    try:
        yield
    finally:
        _running.backends.pop()


@dataclasses.dataclass(frozen=True)
class ProgramCall(ir.Call):
    """A program called without a state inside another program's body.

    Appended to a state (``s += sub(x=...)``) it runs ``sub``'s body on that state. Used as a
    state instead (``r = sub(x=...); r["answer"]``, ``r.text()``), it runs ``sub`` on its own,
    once, on the enclosing program's backend, as SGLang runs such a call.
    """

    backend: Any = dataclasses.field(default=None, compare=False)

    def standalone(self) -> ProgramState:
        """The state of running the program on its own (run on first use)."""
        state = self.__dict__.get("_state")
        if state is None:
            state = self.function.run(*self.args, backend=self.backend, **self.kwargs)
            object.__setattr__(self, "_state", state)
        return state

    def __getitem__(self, name: str) -> Any:
        return self.standalone()[name]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.standalone(), name)


class Function:
    """An LM program: a Python function whose first parameter is the state ``s``.

    Args:
        func: ``def program(s, arg1, arg2, ...)``.
        num_api_spec_tokens: SGLang's token budget for speculative execution against API
            models. Accepted for compatibility; it changes nothing here, since radixlm's backends
            continue a prompt from the prefix cache instead of re-sending it per gen.
        bind_arguments: argument values fixed by :meth:`bind`.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        num_api_spec_tokens: int | None = None,
        bind_arguments: dict[str, Any] | None = None,
    ):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        self._params = list(inspect.signature(func).parameters.values())[1:]
        self.arg_names = [
            p.name for p in self._params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the program.

        - ``sub(s, x)`` with a state: run the body inline on ``s`` (composition).
        - ``sub(x=...)`` inside another program's body: a :class:`ProgramCall`;
          ``s += sub(x=...)`` runs the body on ``s``, reading it as a state runs it alone.
        - ``program(x=..., temperature=0)`` anywhere else: ``program.run(...)`` (returns the
          state).
        """
        if args and isinstance(args[0], ProgramState):
            return self.func(args[0], *args[1:], **{**self.bind_arguments, **kwargs})
        if _running.backends:
            program_kwargs, defaults = self.split_kwargs(kwargs)
            if defaults.set_fields():
                raise TypeError(f"{self.func.__name__}(...) inside a program takes only its own "
                                f"arguments, not generation defaults")  # fmt: skip
            kwargs = {**self.bind_arguments, **program_kwargs}
            return ProgramCall(self, args, kwargs, backend=_running.backends[-1])
        return self.run(*args, **kwargs)

    def bind(self, **kwargs: Any) -> Function:
        """A copy of this program with some arguments fixed.

        Raises:
            TypeError: a name that is not one of the program's parameters.
        """
        unknown = [k for k in kwargs if k not in {p.name for p in self._params}]
        if unknown:
            raise TypeError(f"{self.func.__name__}() has no parameters {unknown}")
        bound = {**self.bind_arguments, **kwargs}
        return Function(self.func, self.num_api_spec_tokens, bound)

    def run(
        self, *args: Any, backend: Backend | None = None, stream: bool = False, **kwargs: Any
    ) -> ProgramState:
        """Run the program once.

        Args:
            *args: the program's positional arguments.
            backend: where to run (default: the one set by ``set_default_backend``).
            stream: return at once and produce the text in the background (``text_iter``).
            **kwargs: the program's keyword arguments, and default generation parameters
                (``temperature=0``, ``max_new_tokens=32``, ...) for every gen in it.

        Returns:
            The final state (with ``stream``: the state being filled).

        Raises:
            Exception: an exception raised by the program's own code, re-raised as SGLang does
                (it is in ``state.error()`` too). Failed generations do not raise here: they
                are recorded in ``state.error()`` and the steps after them are skipped.
        """
        program_kwargs, defaults = self.split_kwargs(kwargs)
        options = ExecutionOptions(resolve_backend(backend), defaults, stream)
        return self._start(options, args, program_kwargs)

    def run_batch(
        self,
        batch_kwargs: Sequence[dict[str, Any] | Sequence[Any]],
        backend: Backend | None = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
        **default_sampling: Any,
    ) -> list[ProgramState] | Iterator[ProgramState]:
        """Run the program once per set of arguments, concurrently.

        Args:
            batch_kwargs: one dict of program arguments per run, or (as SGLang) one list of
                positional argument values per run.
            backend: where to run (default: the default backend).
            num_threads: concurrent runs; "auto" picks one from the batch size and CPUs.
            progress_bar: show a tqdm bar.
            generator_style: return an iterator that yields each state, in input order, as
                soon as it and those before it are done.
            **default_sampling: generation defaults for every run.

        Returns:
            The states, in the order of ``batch_kwargs`` (a list, or an iterator).

        Raises:
            Exception: the first exception a program's own code raised (see :meth:`run`).
        """
        backend = resolve_backend(backend)
        _, defaults = self.split_kwargs(default_sampling)
        jobs = [self.split_kwargs(self.batch_arguments(item))[0] for item in batch_kwargs]
        if global_config.enable_precache_with_tracing and len(jobs) > 1:
            graphs = [self.trace(backend=backend, **kw) for kw in jobs]
            shared = CompiledFunction.shared_prefix(graphs)
            if shared:
                backend.cache_prefix(shared)
        options = [ExecutionOptions(backend, defaults) for _ in jobs]
        states = _iter_many(self, options, jobs, num_threads, progress_bar)
        return states if generator_style else list(states)

    def batch_arguments(self, item: dict[str, Any] | Sequence[Any]) -> dict[str, Any]:
        """One ``run_batch`` item as keyword arguments (a list gives the parameters in order).

        Raises:
            TypeError: a list with more values than the program has parameters.
        """
        if isinstance(item, dict):
            return dict(item)
        if not isinstance(item, (list, tuple)):
            raise TypeError(f"run_batch items are dicts or lists of arguments, not {item!r}")
        if len(item) > len(self.arg_names):
            raise TypeError(f"{self.func.__name__}() takes {len(self.arg_names)} arguments, "
                            f"run_batch gave {len(item)}")  # fmt: skip
        return dict(zip(self.arg_names, item))

    def cache(self, backend: Backend | None = None) -> None:
        """Send the constant text every run of this program begins with, so the cache holds it.

        The program is traced (no generation) to find that text.
        """
        backend = resolve_backend(backend)
        prefix = self.trace(backend=backend).constant_prefix()
        if prefix:
            backend.cache_prefix(prefix)

    def trace(self, *args: Any, backend: Backend | None = None, **kwargs: Any) -> RequestGraph:
        """Run the program symbolically and return its request graph.

        Args:
            backend: renders role markers with its chat template (default: the default backend,
                if any; without one they stay symbolic).
        """
        program_kwargs, _ = self.split_kwargs({**self.bind_arguments, **kwargs})
        backend = backend if backend is not None else get_default_backend()
        renderer = backend.chat_renderer() if backend is not None else None
        with program_body(None):
            return trace_program(self.func, args, program_kwargs, renderer)

    def compile(self) -> CompiledFunction:
        """A version whose runs hoist shared constant prefixes (see :class:`CompiledFunction`)."""
        return CompiledFunction(self)

    def split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], SamplingParams]:
        """Separate the program's own arguments from generation defaults.

        Raises:
            TypeError: a keyword that is neither.
        """
        names = {p.name for p in self._params}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self._params)
        program, sampling = {}, {}
        for key, value in kwargs.items():
            if key in names:
                program[key] = value
            elif SamplingParams.accepts(key):
                sampling[key] = value
            elif takes_any:
                program[key] = value
            else:
                raise TypeError(f"{self.func.__name__}() got an unexpected argument {key!r}")
        return program, SamplingParams.from_kwargs(**sampling)

    def _start(self, options: ExecutionOptions, args: tuple, kwargs: dict) -> ProgramState:
        root = StreamExecutor(options)
        state = ProgramState(root)
        kwargs = {**self.bind_arguments, **kwargs}
        if options.stream:
            worker = threading.Thread(
                target=self._execute, args=(root, state, args, kwargs), daemon=True
            )
            worker.start()
            return state
        body_error = self._execute(root, state, args, kwargs)
        if body_error is not None:
            raise body_error
        return state

    def _execute(
        self, root: StreamExecutor, state: ProgramState, args: tuple, kwargs: dict
    ) -> BaseException | None:
        """Run the body; return the exception the body itself raised (also recorded)."""
        error = None
        try:
            with program_body(root.options.backend):
                state.ret_value = self.func(state, *args, **kwargs)
        except Exception as exc:
            root.sync()  # the steps queued before the exception still run
            root.fail(exc)
            error = exc
        finally:
            root.end()
        if global_config.verbosity >= 2:
            print(root.text)
        return error


class CompiledFunction:
    """A program run through its request graph.

    Before running, each call is traced. For a batch, the longest constant prefix that every
    call begins with is sent once first, so the whole batch then hits the prefix cache instead
    of several calls computing it at the same time. At every fork, the constant text that all
    branches begin with is sent together with the parent's text. Branches and batch items run
    concurrently; a server using ``--schedule-policy dfs-weight`` keeps sibling requests
    together. Hoisting only warms the cache: a program whose control flow depends on generated
    values still runs correctly, it just hoists less.
    """

    def __init__(self, function: Function):
        self.function = function

    def run(
        self, *args: Any, backend: Backend | None = None, stream: bool = False, **kwargs: Any
    ) -> ProgramState:
        """Like :meth:`Function.run`, with fork-prefix hoisting."""
        backend = resolve_backend(backend)
        program_kwargs, defaults = self.function.split_kwargs(kwargs)
        graph = self.function.trace(*args, backend=backend, **program_kwargs)
        options = ExecutionOptions(backend, defaults, stream, graph.fork_prefixes())
        return self.function._start(options, args, program_kwargs)

    def run_batch(
        self,
        batch_kwargs: Sequence[dict[str, Any] | Sequence[Any]],
        backend: Backend | None = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **default_sampling: Any,
    ) -> list[ProgramState]:
        """Like :meth:`Function.run_batch`; the batch's shared constant prefix is sent first."""
        backend = resolve_backend(backend)
        _, defaults = self.function.split_kwargs(default_sampling)
        fn = self.function
        jobs = [fn.split_kwargs(fn.batch_arguments(item))[0] for item in batch_kwargs]
        graphs = [self.function.trace(backend=backend, **kw) for kw in jobs]
        shared = self.shared_prefix(graphs)
        if shared:
            backend.cache_prefix(shared)
        options = [ExecutionOptions(backend, defaults, False, g.fork_prefixes()) for g in graphs]
        return _run_many(self.function, options, jobs, num_threads, progress_bar)

    @staticmethod
    def shared_prefix(graphs: Sequence[RequestGraph]) -> str:
        """The constant text every graph's root begins with ("" for fewer than two graphs)."""
        if len(graphs) < 2:
            return ""
        return hoistable_prefix([g.constant_prefix() for g in graphs])


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """Decorator: ``@function def program(s, ...): ...``; also ``@function()`` and
    ``@function(num_api_spec_tokens=N)`` (see :class:`Function`)."""
    if func is None:
        return functools.partial(Function, num_api_spec_tokens=num_api_spec_tokens)
    return Function(func, num_api_spec_tokens)


def resolve_backend(backend: Backend | None) -> Backend:
    """``backend``, else the default backend.

    Raises:
        ValueError: neither is set.
    """
    backend = backend if backend is not None else get_default_backend()
    if backend is None:
        raise ValueError("no backend: pass backend=... or call set_default_backend(...)")
    return backend


def _iter_many(
    program: Function,
    options: list[ExecutionOptions],
    jobs: list[dict[str, Any]],
    num_threads: int | str,
    progress_bar: bool,
) -> Iterator[ProgramState]:
    """Run every job on a thread pool; yield the states in job order."""
    from tqdm.auto import tqdm

    workers = _thread_count(num_threads, len(jobs))
    bar = tqdm(total=len(jobs), disable=not progress_bar, desc=program.func.__name__)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(program._start, opt, (), kw) for opt, kw in zip(options, jobs)]
        for future in futures:
            future.add_done_callback(lambda _: bar.update(1))
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()  # a consumer that stops early leaves nothing queued
            bar.close()


def _run_many(
    program: Function,
    options: list[ExecutionOptions],
    jobs: list[dict[str, Any]],
    num_threads: int | str,
    progress_bar: bool,
) -> list[ProgramState]:
    return list(_iter_many(program, options, jobs, num_threads, progress_bar))


def _thread_count(num_threads: int | str, jobs: int) -> int:
    if num_threads == "auto":
        return max(1, min(jobs, 16 * (os.cpu_count() or 1), 128))
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be 'auto' or a positive integer, not {num_threads!r}")
    return num_threads
