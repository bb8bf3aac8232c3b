"""One real server and one in-process engine for the SGLang-style programs.

The programs in this folder are written as SGLang programs are (``import radixlm_lang as sgl``,
``sgl.set_default_backend(...)``, ``program.run(...)``) and run unchanged against both backends:
``sgl.Runtime`` (a real ``radixlm serve`` on 127.0.0.1, started with SGLang's argument names)
and ``sgl.EngineBackend`` (the engine in this process). Both serve the default model,
SmolLM2-135M-Instruct, so a greedy answer can be checked where that model is reliably right.
"""

from __future__ import annotations

import pytest

import radixlm_lang as sgl

# SGLang's names for the server options (translated by radixlm_lang.server_args); the same
# CPU/fp32 settings as the shared SmolLM2 engine, with a small KV pool.
SERVER_ARGS = {"device": "cpu", "dtype": "float32", "max_total_tokens": 8192,
               "log_level": "warning"}  # fmt: skip


@pytest.fixture(scope="session")
def sgl_server(smollm2_gguf):
    """``sgl.Runtime(model_path=...)``: a real ``radixlm serve`` subprocess on 127.0.0.1."""
    runtime = sgl.Runtime(model_path=str(smollm2_gguf), **SERVER_ARGS)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="session")
def sgl_engine(smollm2_engine):
    """The session's shared SmolLM2 engine, in this process."""
    return sgl.EngineBackend(smollm2_engine)


@pytest.fixture(params=["server", "engine"])
def backend(request):
    """Each backend in turn, set as the default backend (programs run with ``.run()``)."""
    chosen = request.getfixturevalue("sgl_server" if request.param == "server" else "sgl_engine")
    sgl.set_default_backend(chosen)
    yield chosen
    sgl.set_default_backend(None)
