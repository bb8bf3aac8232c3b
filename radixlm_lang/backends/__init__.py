"""Backends: where a program's requests go."""

from radixlm_lang.backends.base import Backend, BackendError, Completion, StreamDelta
from radixlm_lang.backends.engine import EngineBackend
from radixlm_lang.backends.openai import OpenAI
from radixlm_lang.backends.runtime_endpoint import Runtime, RuntimeEndpoint

__all__ = [
    "Backend", "BackendError", "Completion", "EngineBackend", "OpenAI", "Runtime",
    "RuntimeEndpoint", "StreamDelta",
]  # fmt: skip
