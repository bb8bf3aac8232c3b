"""End a process that is done without CPython's heap teardown.

A process that imported torch, transformers and triton holds some 300k objects; at exit CPython
runs full cyclic collections over them several times while it tears its modules down (1 s of
CPU, 2-3 s of wall time on a loaded 2-core host), and frees memory the OS reclaims anyway. The
runtime's own processes (the engine core, ``python -m radixlm``) end through :func:`exit_now`
instead: what an exit does that has effects still happens, the teardown does not.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int = 0) -> NoReturn:
    """Join non-daemon threads, run the ``atexit`` hooks, flush stdio, then ``os._exit(code)``.

    The hooks are what matter at exit (multiprocessing reaps its children, logging flushes its
    handlers, temporary directories are removed), in the order the interpreter runs them.
    Never call it from a process that is not done (a library's caller, a test runner).

    Args:
        code: the process's exit status.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon and thread.is_alive():
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced by the program
            pass
    os._exit(code)
