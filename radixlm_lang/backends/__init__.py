"""Backends: where a program's requests go."""

from radixlm_lang.backends.base import Backend, BackendError, Completion, StreamDelta
from radixlm_lang.backends.engine import EngineBackend

__all__ = ["Backend", "BackendError", "Completion", "EngineBackend", "StreamDelta"]
