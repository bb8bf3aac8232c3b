"""Activations of the gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a merged gate/up projection.

    Args:
        gate_up: [..., 2 * d], the gate half first, then the up half.

    Returns:
        [..., d] = silu(gate) * up.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
