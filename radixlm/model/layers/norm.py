"""RMSNorm, with a variant that fuses the residual add that precedes it in every decoder layer.

On CUDA tensors both run as one Triton kernel (``triton_ops``); the torch code below is the CPU
path and the reference those kernels are tested against (see ``fused``).
"""

from __future__ import annotations

import torch
from torch import nn

from radixlm.model.layers.fused import fused_ops_for


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32 like HF Llama.

    Args:
        hidden_size: size of the normalised dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise ``x``, or ``x + residual`` when a residual is given.

        Args:
            x: [..., hidden_size].
            residual: the running residual stream, same shape and dtype as ``x``.

        Returns:
            ``normed`` without a residual; ``(normed, x + residual)`` with one (the sum is the
            next residual, kept in the activation dtype as HF does).
        """
        fused = fused_ops_for(x, self.weight, *(() if residual is None else (residual,)))
        if fused is not None and residual is None:
            return fused.rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return rms_norm_reference(x, self.weight, self.eps)
        summed = x + residual
        return rms_norm_reference(summed, self.weight, self.eps), summed


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch RMSNorm (HF Llama's arithmetic): the CPU path and the fused kernels' reference.

    Args:
        x: [..., D].
        weight: [D].
        eps: added to the mean square.

    Returns:
        ``weight * (x * rsqrt(mean(x^2) + eps))``, normalised in float32 and cast back to
        ``x``'s dtype before the weight multiply.
    """
    in_dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(in_dtype)
