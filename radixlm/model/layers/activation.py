"""Activations of the gated MLP (one Triton kernel on CUDA tensors, torch elsewhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixlm.model.layers.fused import fused_ops_for


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a merged gate/up projection.

    Args:
        gate_up: [..., 2 * d], the gate half first, then the up half.

    Returns:
        [..., d] = silu(gate) * up.
    """
    fused = fused_ops_for(gate_up)
    if fused is not None:
        return fused.silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The torch SwiGLU (two kernels): the CPU path and the fused kernel's reference.

    Args:
        gate_up: [..., 2 * d], the gate half first.

    Returns:
        [..., d] = silu(gate) * up.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
