"""Which path a layer takes: the fused Triton kernels (triton_ops) or the torch reference.

The fused kernels run on CUDA tensors of a supported dtype. ``RADIXLM_DISABLE_FUSED=1`` turns them
off (read at each call, so a benchmark can capture one CUDA graph with and one without them).
Without triton installed every layer stays on torch.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

DISABLE_FUSED_ENV = "RADIXLM_DISABLE_FUSED"

# triton is a Linux-only dependency. Test for it rather than catching ImportError, which would
# also hide a real import error inside triton_ops behind a silent torch fallback.
if importlib.util.find_spec("triton") is None:
    triton_ops = None
else:
    from radixlm.model.layers import triton_ops


def fused_disabled() -> bool:
    """Whether ``RADIXLM_DISABLE_FUSED`` asks for the torch layers everywhere."""
    return os.environ.get(DISABLE_FUSED_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fused_ops_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The ``triton_ops`` module when these tensors should take the fused kernels, else None.

    Args:
        tensors: a layer's inputs (and weight); all must be CUDA tensors of one supported dtype.

    Returns:
        ``triton_ops``, or None for the torch path.
    """
    first = tensors[0]
    if triton_ops is None or not first.is_cuda or first.dtype not in triton_ops.SUPPORTED_DTYPES:
        return None
    if any(t.dtype != first.dtype or not t.is_cuda for t in tensors[1:]):
        return None
    return None if fused_disabled() else triton_ops
