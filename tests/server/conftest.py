"""Start the real server (`python -m radixlm serve`) in a subprocess on a free local port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from radixlm.model.demo import ensure_demo_model

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running ``radixlm serve`` subprocess; its output is collected in ``lines``."""

    def __init__(self, args: list[str], env: dict[str, str], scheme: str = "http"):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "radixlm", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output}")
            try:
                if httpx.get(self.url + "/health", timeout=5, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server did not become healthy:\n{self.output}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, wait for a clean exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def radixlm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("radixlm-cache")


@pytest.fixture(scope="session")
def demo_model_dir(radixlm_cache) -> Path:
    """The demo model (random weights), for servers that need a fast model named explicitly."""
    return ensure_demo_model(radixlm_cache)


@pytest.fixture(scope="session")
def launch_server(radixlm_cache):
    """``launch_server(args) -> ServerProcess`` (healthy); every server is stopped at the end.

    ``launch_server(args, scheme="https")`` for a server started with a certificate.
    """
    started: list[ServerProcess] = []
    cache = radixlm_cache

    def launch(args: list[str], scheme: str = "http") -> ServerProcess:
        # the build itself is covered by tests/model/test_demo.py; doing it here, where
        # transformers is already imported, keeps server start-up short
        demo_dir = ensure_demo_model(cache)
        if "--model" not in args:  # these tests serve the demo model, not the default SmolLM2
            args = ["--model", str(demo_dir), *args]
        env = {**os.environ, "RADIXLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
        server = ServerProcess(args, env, scheme)
        started.append(server)
        server.wait_ready()
        return server

    yield launch
    for server in started:
        server.kill()
