"""Unquantized linear layers at a few rows: the tuned GEMV where it measured faster than cuBLAS."""

from __future__ import annotations

import torch
from torch import nn

from radixlm.model.layers.gemv_triton import GEMV_MAX_M, GemvTile, gemv
from radixlm.model.layers.tuned import tuned_choice


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain ``nn.Linear`` on CUDA with at most ``GEMV_MAX_M`` rows takes the GEMV
    kernel when this GPU's tuned plan (:mod:`radixlm.model.layers.tuned`) chose it for the shape.

    Args:
        layer: any projection module (FP8 and tensor-parallel layers pick their own kernels).
        x: [..., in_features] activations.

    Returns:
        [..., out_features].
    """
    if type(layer) is not nn.Linear or not x.is_cuda:
        return layer(x)
    rows = x.numel() // x.shape[-1]
    if rows > GEMV_MAX_M:
        return layer(x)
    n, k = layer.weight.shape
    choice = tuned_choice(x.device, "bf16", n, k, rows)
    if choice is None or choice.kernel != "gemv":
        return layer(x)
    tile = GemvTile(choice.block_n, choice.block_k, choice.num_warps)
    out = gemv(x.reshape(rows, k), layer.weight, None, layer.bias, tile)
    return out.reshape(*x.shape[:-1], n)
