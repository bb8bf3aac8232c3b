"""The model side of the runtime: architecture parsing, layers, models, attention, loading."""

from radixlm.model.arch import SUPPORTED_ARCHITECTURES, ModelArch, UnsupportedModelError
from radixlm.model.loader import load_model, resolve_device, resolve_dtype
from radixlm.model.models.decoder import CausalLM

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "ModelArch",
    "UnsupportedModelError",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]
