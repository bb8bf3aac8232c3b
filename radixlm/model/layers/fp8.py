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
  widens it in registers and multiplies with the unquantized activation (W8A16). A small-M step is
  bound by the weight bytes, which FP8 halves either way; skipping the activation quantization
  saves a launch and keeps the activation exact. Up to ``gemv_max_m`` rows that kernel is the
  weight-streaming GEMV of :mod:`radixlm.model.layers.gemv_triton` (CUDA cores, thousands of
  programs); above it, the tensor-core small-M kernel of :mod:`radixlm.model.layers.fp8_triton`.
- Anywhere else (CPU; GPUs without FP8): the reference path dequantizes the weight (once, kept in
  float32 by ``Fp8Linear``) and multiplies in float32, emulating the GPU path of the same row
  count: above ``triton_max_m`` rows it first rounds the activation through per-token FP8 (the
  ``_scaled_mm`` arithmetic, W8A8), at or below it keeps the activation exact (W8A16). So
  accuracy measured on CPU is what the GPU delivers, up to the summation order.

The embedding, LM head and norms are never quantized (the callers only route the decoder's
projection matrices here).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from radixlm.model.layers.gemv_triton import GemvTile, gemv
from radixlm.model.layers.tuned import MAX_TUNED_M, KernelChoice, tuned_choice

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Smallest amax a scale is derived from: an all-zero row must not divide by zero.
MIN_AMAX = 1e-12


@dataclass(frozen=True)
class Fp8LinearConfig:
    """How ``Fp8Linear`` runs on CUDA.

    Attributes:
        triton_max_m: rows up to which a Triton W8A16 kernel runs instead of
            ``torch._scaled_mm`` (0: always ``_scaled_mm``).
        gemv_max_m: rows up to which that kernel is the GEMV (at most
            ``gemv_triton.GEMV_MAX_M``; 0: never).
    """

    triton_max_m: int = 16
    gemv_max_m: int = 4


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
    if device.type != "cuda":
        return False
    return _cuda_has_fp8(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_has_fp8(index: int) -> bool:
    # Cached: every FP8 layer asks on every forward.
    return torch.cuda.is_available() and torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    quantize_input: bool = True,
    dequantized: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FP8 linear layer by dequantization: what the GPU kernels are tested against.

    Args:
        x: [M, K] activations.
        weight: [N, K] FP8 weight.
        weight_scale: [N] float32 per-channel scales.
        bias: optional [N] bias.
        quantize_input: round the activation through per-token FP8 first (the ``_scaled_mm``
            path, W8A8); False keeps it exact (the Triton small-M path, W8A16).
        dequantized: ``weight * weight_scale[:, None]`` in float32 if already at hand.

    Returns:
        [M, N] in ``x``'s dtype.
    """
    xf = x.float()
    if quantize_input:
        x_fp8, x_scale = quantize_rows(xf)
        xf = x_fp8.float() * x_scale
    if dequantized is None:
        dequantized = dequantize(weight, weight_scale.float()[:, None], torch.float32)
    out = xf @ dequantized.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Fp8LinearConfig = DEFAULT_FP8_LINEAR_CONFIG,
    dequantized: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` through the fastest path the device has (module doc).

    Args:
        x: [..., K] activations (bf16/fp16/fp32).
        weight: [N, K] FP8 weight, row-major.
        weight_scale: [N] float32 per-output-channel scales.
        bias: optional [N] bias in ``x``'s dtype.
        config: path selection (on CPU it picks which GPU path the reference emulates).
        dequantized: the float32 dequantized weight, for the reference path (else computed).

    Returns:
        [..., N] in ``x``'s dtype.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not fp8_gemm_supported(x.device):
        # Emulate the GPU path of this row count: W8A16 for small M, W8A8 above.
        small = x2.shape[0] <= config.triton_max_m
        out = fp8_linear_reference(x2, weight, weight_scale, bias, not small, dequantized)
    elif (choice := _choose(x2.shape[0], weight, x.device, config)) is None:
        # _scaled_mm wants 16-aligned K and N; odd shapes take the (slow, exact) reference.
        out = fp8_linear_reference(x2, weight, weight_scale, bias)
    else:
        out = run_fp8_choice(choice, x2, weight, weight_scale, bias)
    return out.reshape(*lead, weight.shape[0])


def _choose(
    m: int, weight: torch.Tensor, device: torch.device, config: Fp8LinearConfig
) -> KernelChoice | None:
    """The kernel for ``m`` rows on a GPU with FP8: this GPU's tuned plan where it has the
    shape, else the defaults of the module doc; None for the reference (unaligned shapes)."""
    n, k = weight.shape
    if m <= MAX_TUNED_M and (tuned := tuned_choice(device, "fp8", n, k, m)) is not None:
        return tuned
    if m <= config.gemv_max_m:
        return KernelChoice("gemv")
    if m <= config.triton_max_m:
        return KernelChoice("dot")
    if n % 16 or k % 16:
        return None
    return KernelChoice("scaled_mm")


def run_fp8_choice(
    choice: KernelChoice,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` through the chosen kernel (a tile of 0: its default).

    Args:
        choice: the kernel and tile.
        x: [M, K] activations.
        weight: [N, K] FP8 weight.
        weight_scale: [N] float32 per-channel scales.
        bias: optional [N] bias.

    Returns:
        [M, N] in ``x``'s dtype.
    """
    if choice.kernel == "gemv":
        tile = None
        if choice.block_n:
            tile = GemvTile(choice.block_n, choice.block_k, choice.num_warps, choice.widen)
        return gemv(x, weight, weight_scale, bias, tile)
    if choice.kernel == "swap_ab":
        from radixlm.model.layers.fp8_triton import fp8_swap_ab_gemm

        return fp8_swap_ab_gemm(x, weight, weight_scale, bias, choice.block_n, choice.block_k,
                                choice.split_k)  # fmt: skip
    if choice.kernel in ("dot", "dot_f16"):
        from radixlm.model.layers.fp8_triton import fp8_small_m_gemm

        operands = "float16" if choice.kernel == "dot_f16" else "input"
        return fp8_small_m_gemm(x, weight, weight_scale, bias, choice.block_n or None,
                                choice.block_k or None, operands)  # fmt: skip
    return _scaled_mm_linear(x, weight, weight_scale, bias)


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
        # The reference path's float32 copy of the weight, and the versions it was made from.
        self._dequantized: torch.Tensor | None = None
        self._dequantized_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dequantized = None if fp8_gemm_supported(x.device) else self._reference_weight()
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.config, dequantized)

    def weights_changed(self) -> None:
        """Drop the reference path's float32 copy (call after writing through ``.data``, which
        in-place version counters do not see; the loader calls it when it finishes)."""
        self._dequantized = self._dequantized_key = None

    def _reference_weight(self) -> torch.Tensor:
        """Dequantized once, not on every call: where the reference path serves (CPU) it
        dominated the step. Made again when the weight or scales change in place."""
        w, s = self.weight, self.weight_scale
        # Inference tensors keep no version counter: there only a load (weights_changed) or a
        # new tensor invalidates the copy.
        versions = (0, 0) if w.is_inference() or s.is_inference() else (w._version, s._version)
        key = (w.data_ptr(), s.data_ptr(), *versions)
        if key != self._dequantized_key:
            self._dequantized = dequantize(w, s.float()[:, None], torch.float32)
            self._dequantized_key = key
        return self._dequantized

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
