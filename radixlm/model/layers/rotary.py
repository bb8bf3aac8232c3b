"""Rotary position embedding (neox / HF Llama style: the two halves of a head rotate together).

On CUDA tensors the rotation is one Triton kernel for q and k (``triton_ops``); the torch code is
the CPU path and the reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from radixlm.model.arch import RopeScaling
from radixlm.model.layers.fused import fused_ops_for


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, scaled as the config asks.

    Args:
        head_dim: rotated dimension (the whole head).
        theta: rotary base.
        scaling: None, linear or llama3 scaling.

    Returns:
        The inverse frequencies on the CPU.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend the band between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding by absolute position from a float32 cos/sin cache.

    Args:
        head_dim: size of one head (all of it rotates).
        max_positions: cache length; positions must stay below it.
        theta: rotary base.
        scaling: optional linear / llama3 scaling.
    """

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None
    ):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos_sin_cache", self._compute_cache(), persistent=False)

    def _compute_cache(self, device: torch.device | str | None = None) -> torch.Tensor:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = positions[:, None] * inv_freq[None, :]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def rebuild_cache(self) -> None:
        """Recompute the cache on the module's device in float32.

        Needed after the module was built on the meta device and materialised with
        ``to_empty`` (which leaves buffers uninitialised), or after a dtype cast.
        """
        self.cos_sin_cache = self._compute_cache(self.cos_sin_cache.device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k.

        Args:
            positions: [T] absolute positions.
            q: [T, num_heads, head_dim].
            k: [T, num_kv_heads, head_dim].

        Returns:
            Rotated (q, k), same shapes and dtypes.
        """
        fused = fused_ops_for(q, k)
        if fused is not None and self.cos_sin_cache.is_cuda:
            return fused.rotary_embedding(positions, q, k, self.cos_sin_cache)
        return rotary_reference(positions, q, k, self.cos_sin_cache)


def rotary_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch rotary (HF Llama's arithmetic): the CPU path and the fused kernel's reference.

    Args:
        positions: [T] absolute positions.
        q: [T, num_heads, head_dim].
        k: [T, num_kv_heads, head_dim].
        cos_sin_cache: [max_positions, head_dim] float32, cos then sin of the frequencies.

    Returns:
        Rotated (q, k), new tensors of the same shapes and dtypes.
    """
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    # HF casts cos/sin to the activation dtype before rotating; doing the same keeps bf16
    # results bit-compatible with it.
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(q.dtype)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin
