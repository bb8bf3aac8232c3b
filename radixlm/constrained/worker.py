"""A compile worker process: builds token indexes where a runaway build can be killed.

The child is a fresh interpreter (``python -m radixlm.constrained.worker``: no fork of a
threaded, CUDA-holding parent, and no re-import of the parent's ``__main__``). It imports only
the index builder, applies an address-space limit to itself, then serves one job at a time over
its stdin/stdout as length-prefixed pickles. The parent enforces the wall-clock limit: on
timeout it SIGKILLs the child (the Rust index builder never checks for signals).

A worker never outlives its parent: on Linux the kernel SIGKILLs it when the thread that started
it dies (``PR_SET_PDEATHSIG``, so a ``kill -9`` of the engine core takes its workers along even
mid-build); elsewhere a watcher thread exits once the parent's pid is gone; and between jobs an
EOF on stdin ends it.
"""

from __future__ import annotations

import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

from radixlm.constrained.errors import GrammarError
from radixlm.constrained.json_schema import JsonSchemaOptions

_START_TIMEOUT_S = 120.0
_HEADER = struct.Struct("<Q")


class WorkerProcess:
    """Parent-side handle of one compile worker.

    Args:
        vocab_blob: pickled (token bytes, first fake id) for ``index_build.TokenTables``.
        options: schema compiler options.
        dummy_prefix: whether the tokenizer adds a SentencePiece dummy space.
        memory_limit_mb: the child's address-space limit (0 = none).
    """

    def __init__(
        self,
        vocab_blob: bytes,
        options: JsonSchemaOptions,
        dummy_prefix: bool,
        memory_limit_mb: int,
    ):
        self._process = subprocess.Popen(
            [sys.executable, "-m", "radixlm.constrained.worker", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_child_env(),
        )
        try:
            _send(self._process.stdin, (vocab_blob, options, dummy_prefix, memory_limit_mb))
            if self._receive(_START_TIMEOUT_S) != "ready":
                raise EOFError
        except (EOFError, OSError, TimeoutError):
            self.kill()
            raise GrammarError("grammar worker failed to start", feature="crash") from None

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._process.pid

    def alive(self) -> bool:
        return self._process.poll() is None

    def run(self, kind: str, spec: Any, timeout_s: float) -> Any:
        """Build one index. Raises GrammarError (the worker is killed on timeout or crash)."""
        try:
            _send(self._process.stdin, (kind, spec))
            status, value = self._receive(timeout_s)
        except TimeoutError:
            self.kill()
            raise GrammarError(
                f"grammar compilation timed out after {timeout_s:g} s", feature="timeout"
            ) from None
        except (EOFError, OSError):
            self.kill()
            raise GrammarError(
                "grammar compilation crashed (out of memory?)", feature="memory"
            ) from None
        if status == "ok":
            return value
        message, feature = value
        raise GrammarError(message, feature=feature)

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        if self._process.poll() is None:
            self._process.kill()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self._process.stdin, self._process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _receive(self, timeout_s: float) -> Any:
        stream = self._process.stdout
        deadline = time.monotonic() + timeout_s
        header = _read_exact(stream, _HEADER.size, deadline)
        (length,) = _HEADER.unpack(header)
        return pickle.loads(_read_exact(stream, length, deadline))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(stream: BinaryIO, size: int, deadline: float) -> bytes:
    """Read ``size`` bytes before ``deadline`` (TimeoutError) or EOF (EOFError)."""
    chunks = []
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    try:
        while size:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError
            chunk = os.read(stream.fileno(), min(size, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            size -= len(chunk)
    finally:
        selector.close()
    return b"".join(chunks)


def _read_blocking(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (length,) = _HEADER.unpack(header)
    data = stream.read(length)
    if len(data) < length:
        raise EOFError
    return pickle.loads(data)


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Child main loop: init frame, then one (kind, spec) job per frame."""
    vocab_blob, options, dummy_prefix, memory_limit_mb = _read_blocking(stdin)
    if memory_limit_mb:
        _limit_memory(memory_limit_mb)
    sys.setrecursionlimit(20000)
    from radixlm.constrained.index_build import FakeIds, TokenTables, build_index

    token_bytes, fake_base = pickle.loads(vocab_blob)
    tables = TokenTables(token_bytes, FakeIds(fake_base))
    _send(stdout, "ready")
    while True:
        try:
            kind, spec = _read_blocking(stdin)
        except EOFError:
            return
        _send(stdout, _job(build_index, kind, spec, options, dummy_prefix, tables))


def _job(build_index, kind, spec, options, dummy_prefix, tables) -> tuple[str, Any]:
    try:
        return "ok", build_index(kind, spec, options, dummy_prefix, tables)
    except GrammarError as exc:
        return "error", (str(exc), exc.feature)
    except MemoryError:
        return "error", ("grammar compilation ran out of memory", "memory")
    except RecursionError:
        return "error", ("schema nesting too deep", "depth")
    except Exception as exc:  # report, keep serving
        return "error", (f"grammar compilation failed: {exc!r}"[:500], "crash")


def _limit_memory(megabytes: int) -> None:
    try:
        import resource

        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not on this platform: the timeout still holds
        pass


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` (the process that started it) dies.

    Args:
        parent_pid: the parent's pid, as the parent saw it (checked after arming the signal,
            so a parent that died before that is noticed too).
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


_PR_SET_PDEATHSIG = 1


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def main() -> None:
    """Entry point: die with the parent, keep stray prints off the protocol stream, serve."""
    if len(sys.argv) > 1:
        die_with_parent(int(sys.argv[1]))
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, protocol)


if __name__ == "__main__":
    main()
