"""``radixlm serve`` start-up checks: one clear line and exit code 2, before any model loads."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.server.startup import (
    StartupError,
    check_device,
    check_model,
    check_port_free,
    check_startup,
)

ROOT = Path(__file__).resolve().parents[2]


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "radixlm", "serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def listening():
    """A socket listening on a free port of 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_busy_port_is_refused(listening):
    with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{listening}"):
        check_port_free("127.0.0.1", listening)


def test_free_port_passes():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    check_port_free("127.0.0.1", port)


def test_missing_model_path(tmp_path):
    with pytest.raises(StartupError, match="no such file or directory"):
        check_model(str(tmp_path / "nope"), None)


def test_directory_without_model_or_tokenizer(tmp_path, tiny_llama3_dir):
    with pytest.raises(StartupError, match="neither config.json"):
        check_model(str(tmp_path), None)
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama3_dir / name, weights_only / name)
    with pytest.raises(StartupError, match="no tokenizer files there.*--tokenizer DIR"):
        check_model(str(weights_only), None)
    check_model(str(weights_only), str(tiny_llama3_dir))  # an explicit tokenizer fixes it
    check_model(str(tiny_llama3_dir), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine has no CUDA device")
def test_cuda_without_a_gpu():
    with pytest.raises(StartupError, match="--device cuda: no CUDA device is available"):
        check_device("cuda")
    check_device("cpu")
    check_device("auto")


def test_check_startup_covers_all(listening, tmp_path):
    config = EngineConfig.from_kwargs(model=str(tmp_path / "nope"))
    with pytest.raises(StartupError, match="cannot listen"):  # the port is checked first
        check_startup("127.0.0.1", listening, config)


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(listening, tmp_path):
    missing = serve("--model", str(tmp_path / "nope"), "--port", "0")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"radixlm serve: --model {tmp_path / 'nope'}: no such file or directory"
    ]
    busy = serve("--port", str(listening))  # the default model: refused before it loads
    assert busy.returncode == 2
    lines = busy.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("radixlm serve: cannot listen on")
    assert "Loading weights" not in busy.stdout + busy.stderr
