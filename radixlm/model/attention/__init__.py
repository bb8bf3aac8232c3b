"""Attention backends: the torch reference (any device) and Triton kernels (CUDA; CPU interpreter).

``create_attention_backend`` picks one by name; "auto" takes Triton on CUDA and torch elsewhere.
"""

from __future__ import annotations

import torch

from radixlm.model.attention.base import AttentionBackend
from radixlm.model.attention.torch_backend import TorchAttentionBackend

try:
    from radixlm.model.attention.triton_backend import TritonAttentionBackend
except ImportError as exc:  # triton is a Linux-only dependency
    TritonAttentionBackend = None
    _TRITON_IMPORT_ERROR: ImportError | None = exc
else:
    _TRITON_IMPORT_ERROR = None

BACKEND_NAMES = ("auto", "torch", "triton")


def create_attention_backend(
    name: str, device: torch.device | str, sliding_window: int | None = None
) -> AttentionBackend:
    """Build the attention backend called ``name``.

    Args:
        name: "auto" (triton on CUDA, torch otherwise), "torch" or "triton".
        device: where the model runs.
        sliding_window: if set, a token at position p sees only positions (p - window, p].

    Returns:
        A fresh backend.

    Raises:
        ValueError: ``name`` is none of ``BACKEND_NAMES``.
        ImportError: "triton" was asked for where triton cannot be imported.
    """
    device = torch.device(device)
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKEND_NAMES}")
    if name == "auto":
        use_triton = device.type == "cuda" and TritonAttentionBackend is not None
        name = "triton" if use_triton else "torch"
    if name == "torch":
        return TorchAttentionBackend(sliding_window=sliding_window)
    if TritonAttentionBackend is None:
        raise ImportError(f"the triton attention backend needs triton: {_TRITON_IMPORT_ERROR}")
    return TritonAttentionBackend(device, sliding_window=sliding_window)


__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "TorchAttentionBackend",
    "TritonAttentionBackend",
    "create_attention_backend",
]
