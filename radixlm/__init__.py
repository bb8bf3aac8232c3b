"""radixlm: a structured LM programming runtime with a radix prefix cache.

The top-level names load lazily, so importing a leaf module (``radixlm.kvcache``) never pulls in
the engine and everything beneath it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CacheConfig": "radixlm.config",
    "EngineConfig": "radixlm.config",
    "ModelConfig": "radixlm.config",
    "SchedulerConfig": "radixlm.config",
    "Engine": "radixlm.engine.engine",
    "EngineDeadError": "radixlm.engine.errors",
    "QueueFullError": "radixlm.engine.errors",
    "RequestError": "radixlm.engine.errors",
    "SamplingParams": "radixlm.sampling_params",
    "SamplingParamsError": "radixlm.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radixlm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
