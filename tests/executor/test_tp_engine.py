"""Tensor parallelism through the public Engine (core in its own process, CPU, gloo).

A rank killed mid-generation: the request in flight fails with EngineDeadError naming the rank,
later calls fail the same way (the server maps that to 503, as for a dead core), the core process
exits, and no process it started outlives it (one engine: a core process and its fork server
take seconds to start).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from radixlm.bench.common import write_synthetic_tokenizer
from radixlm.engine.engine import Engine
from radixlm.engine.errors import EngineDeadError
from radixlm.model.random_model import make_random_model_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; gloo workers on Linux"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = make_random_model_dir(
        tmp_path_factory.mktemp("tp-engine") / "m", "llama", num_key_value_heads=2, vocab_size=300
    )
    write_synthetic_tokenizer(path, 300, 1, 2)
    return path


def _process_table() -> dict[int, int]:
    """Live (non-zombie) pid -> parent pid, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if fields[0] != "Z":
                table[int(entry)] = int(fields[1])
    return table


def children(pid: int) -> list[int]:
    return sorted(p for p, parent in _process_table().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def tp_workers(core_pid: int) -> list[int]:
    """The rank processes: children of the core's fork server (the child that has children)."""
    servers = [p for p in children(core_pid) if children(p)]
    assert len(servers) == 1, servers
    return children(servers[0])


def start(model: Path) -> Engine:
    return Engine(
        model=str(model), tp_size=2, kv_cache_tokens=4096, grammar_backend="outlines", device="cpu"
    )


def wait_gone(pids: list[int], seconds: float = 10) -> list[int]:
    """The pids still alive after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = [p for p in pids if p in _process_table()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_killed_rank_fails_requests_and_leaves_no_process(model):
    engine = start(model)
    core_pid = engine._proc.pid
    started = descendants(core_pid)
    info = engine.server_info()
    assert info["tp_size"] == 2 and [r["device"] for r in info["tp_ranks"]] == ["cpu", "cpu"]
    assert engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})
    errors: list[BaseException] = []

    def long_request():
        try:
            engine.generate(
                input_ids=list(range(3, 30)),
                sampling_params={"max_new_tokens": 2000, "ignore_eos": True},
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    workers = tp_workers(core_pid)
    assert len(workers) == 2
    victim = workers[-1]  # the later fork: rank 1
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - killed_at < 5
    assert errors and isinstance(errors[0], EngineDeadError)
    assert "rank" in str(errors[0])
    with pytest.raises(EngineDeadError):
        engine.generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 1})
    engine.shutdown()
    assert not engine._proc.is_alive()
    assert wait_gone([core_pid, *started]) == []
