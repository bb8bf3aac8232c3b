"""FP8 (e4m3) weights: quantization helpers and the FP8 linear layer.

Weights are stored as ``float8_e4m3fn`` with one float32 scale per output channel
(``w ~= w_fp8 * weight_scale[:, None]``). A checkpoint with one scale per tensor (the common vLLM /
SGLang layout) broadcasts that scale over the tensor's rows, so every layer has the same layout.

How a forward runs depends on the device and the row count M (tokens):

- CUDA with FP8 tensor cores (sm89+), M > ``Fp8LinearConfig.triton_max_m``: the activation is
  quantized per token (one Triton launch: row amax, scale, cast) and multiplied with
  ``torch._scaled_mm`` using row-wise scales (per-token for the activation, per-channel for the
  weight); the product comes out in bfloat16.
- CUDA, M <= ``triton_max_m`` (decode at small batch): a Triton kernel reads the FP8 weight,
  widens it to the activation dtype in registers and multiplies with the unquantized activation
  (W8A16). A small-M step is bound by the weight bytes, which FP8 halves either way; skipping the
  activation quantization saves a launch and keeps the activation exact.
- Anywhere else (CPU; GPUs without FP8): the reference path quantizes the activation per token
  and dequantizes both operands, then multiplies in float32. That is exactly the arithmetic of the
  ``_scaled_mm`` path (up to the summation order), so accuracy measured on CPU is what the GPU's
  W8A8 path delivers.

The embedding, LM head and norms are never quantized (the callers only route the decoder's
projection matrices here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Smallest amax a scale is derived from: an all-zero row must not divide by zero.
MIN_AMAX = 1e-12


@dataclass(frozen=True)
class Fp8LinearConfig:
    """How ``Fp8Linear`` runs on CUDA.

    Attributes:
        triton_max_m: rows up to which the Triton W8A16 kernel runs instead of
            ``torch._scaled_mm`` (0: always ``_scaled_mm``).
    """

    triton_max_m: int = 16


DEFAULT_FP8_LINEAR_CONFIG = Fp8LinearConfig()


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x / scale`` saturated to the e4m3 range and rounded to nearest (even) FP8.

    Args:
        x: any float tensor.
        scale: a scalar or a tensor broadcastable against ``x``.

    Returns:
        ``float8_e4m3fn`` tensor of ``x``'s shape.
    """
    scaled = x.float() / scale
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row (last dim) with its own scale ``amax(|row|) / 448``.

    Used per output channel for weights ([N, K]) and per token for activations ([M, K]).

    Args:
        x: [..., K] float tensor.

    Returns:
        (FP8 tensor of ``x``'s shape, float32 scales of shape [..., 1]).
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=MIN_AMAX)
    scale = amax / FP8_MAX
    return quantize_with_scale(x, scale), scale


def dequantize(
    x_fp8: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype
) -> torch.Tensor:
    """``x_fp8 * scale`` in float32, then cast to ``dtype``.

    Args:
        x_fp8: FP8 tensor.
        scale: a scalar or a tensor broadcastable against it.
        dtype: result dtype.

    Returns:
        The dequantized tensor.
    """
    return (x_fp8.float() * scale).to(dtype)


def fp8_gemm_supported(device: torch.device) -> bool:
    """Whether ``device`` has FP8 tensor cores (CUDA compute capability 8.9 or newer)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    quantize_input: bool = True,
) -> torch.Tensor:
    """The FP8 linear layer by dequantization: what the GPU kernels are tested against.

    Args:
        x: [M, K] activations.
        weight: [N, K] FP8 weight.
        weight_scale: [N] float32 per-channel scales.
        bias: optional [N] bias.
        quantize_input: round the activation through per-token FP8 first (the ``_scaled_mm``
            path, W8A8); False keeps it exact (the Triton small-M path, W8A16).

    Returns:
        [M, N] in ``x``'s dtype.
    """
    xf = x.float()
    if quantize_input:
        x_fp8, x_scale = quantize_rows(xf)
        xf = x_fp8.float() * x_scale
    out = xf @ (weight.float() * weight_scale.float()[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Fp8LinearConfig = DEFAULT_FP8_LINEAR_CONFIG,
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` through the fastest path the device has (module doc).

    Args:
        x: [..., K] activations (bf16/fp16/fp32).
        weight: [N, K] FP8 weight, row-major.
        weight_scale: [N] float32 per-output-channel scales.
        bias: optional [N] bias in ``x``'s dtype.
        config: path selection on CUDA.

    Returns:
        [..., N] in ``x``'s dtype.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not fp8_gemm_supported(x.device):
        out = fp8_linear_reference(x2, weight, weight_scale, bias)
    elif x2.shape[0] <= config.triton_max_m:
        from radixlm.model.layers.fp8_triton import fp8_small_m_gemm

        out = fp8_small_m_gemm(x2, weight, weight_scale, bias)
    else:
        out = _scaled_mm_linear(x2, weight, weight_scale, bias)
    return out.reshape(*lead, weight.shape[0])


def _scaled_mm_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    from radixlm.model.layers.fp8_triton import quantize_per_token

    x_fp8, x_scale = quantize_per_token(x.contiguous())
    # Row-wise scaling: [M, 1] activation scales and [1, N] weight scales; weight.t() is the
    # column-major [K, N] operand cuBLASLt/CUTLASS want. Output in bf16: the only type every
    # row-wise implementation (CUTLASS on older CUDA, cuBLASLt from 12.9) accepts on sm90.
    out = torch._scaled_mm(
        x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
        out_dtype=torch.bfloat16,
    )  # fmt: skip
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype)


class Fp8Linear(nn.Module):
    """A linear layer whose weight is FP8 with per-output-channel float32 scales.

    ``weight`` and ``weight_scale`` keep their dtypes through module-wide dtype casts
    (``model.to(torch.bfloat16)``): only the bias follows the model dtype.

    Args:
        in_features: K.
        out_features: N.
        bias: whether the layer has a (high-precision) bias.
        device: where the tensors are allocated (default: torch's current default device).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
            requires_grad=False,
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.config = DEFAULT_FP8_LINEAR_CONFIG

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.config)

    def _apply(self, fn, recurse: bool = True):
        # Let device moves and to_empty through; refuse dtype changes of the quantized tensors.
        # Detached aliases: _apply may swap a parameter's .data in place.
        kept = {name: getattr(self, name).detach() for name in ("weight", "weight_scale")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                # fn changed the dtype (and maybe the device): redo it as a device move only.
                moved = before.to(after.device)
                setattr(self, name, nn.Parameter(moved, requires_grad=False))
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=float8_e4m3fn per-channel"
        )
