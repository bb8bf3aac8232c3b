"""radixlm: a structured LM programming runtime with a radix prefix cache."""

from radixlm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixlm.engine.engine import Engine
from radixlm.engine.errors import EngineDeadError, QueueFullError, RequestError
from radixlm.sampling_params import SamplingParams, SamplingParamsError

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "ModelConfig",
    "QueueFullError",
    "RequestError",
    "SamplingParams",
    "SamplingParamsError",
    "SchedulerConfig",
]
