"""The weight-streaming product for a few rows (decode at batch 1-8): ``x @ W.T`` on CUDA cores.

At batch 1 a linear layer is a matrix-vector product: every weight byte is read once and used
for one multiply-add per row, so the step is bound by how fast the weight streams from HBM, not
by arithmetic. Tensor-core tiles (``tl.dot``) need at least 16 rows and a tile pipeline sized for
reuse; here each program instead owns ``BLOCK_N`` output channels, walks the whole K in
``BLOCK_K`` slices and keeps a ``[BLOCK_M, BLOCK_N, BLOCK_K]`` float32 partial sum in registers,
reduced once at the end. Small ``BLOCK_N`` gives thousands of programs, enough loads in flight to
keep HBM busy without splitting K across programs (so nothing is reduced through memory and the
kernel is one launch, graph-capturable).

The weight may be FP8 (e4m3, with one float32 scale per output channel, applied once to the sum)
or the activation dtype (bf16/fp16/fp32); FP8 widens to float32 exactly.

The same body runs under the Triton interpreter on CPU tensors (the tests check it there against
a float64 reference at tiny sizes); on the GPU ``tests/model/layers/test_gemv.py`` checks the
compiled kernel at the Llama-3-8B projection shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixlm.model.attention.triton_kernels._dispatch import (
    dual_kernel,
    next_pow2,
    runs_interpreted,
)

# Rows the kernel takes: the partial sums are BLOCK_M x BLOCK_N x BLOCK_K registers.
GEMV_MAX_M = 8


# An e4m3 byte's magnitude bits moved into a float32's exponent/mantissa fields give the value
# times 2^-120 (bias 7 against 127), subnormals included; the factor goes into the scale.
_E4M3_BITS_FACTOR = 2.0**120


@dataclass(frozen=True)
class GemvTile:
    """One launch shape: output channels per program, K slice per iteration, warps, and how
    FP8 weights are widened: ``"cvt"`` (the hardware conversion, through fp16) or ``"bits"``
    (integer shifts into a float32, which keeps the conversion off the slower convert unit)."""

    block_n: int
    block_k: int
    num_warps: int
    widen: str = "cvt"


def default_tile(m: int, n: int, k: int, weight_bytes: int) -> GemvTile:
    """The tile ``bench fp8-gemm`` measured best on the H200 for this shape (see its table in
    docs/benchmarks.md); under the interpreter a small one, which only needs to be correct.

    Args:
        m: rows (<= ``GEMV_MAX_M``).
        n: output channels.
        k: input features.
        weight_bytes: bytes per weight element (1 for FP8, 2 for bf16).

    Returns:
        The tile.
    """
    rows = next_pow2(m)
    # Keep the per-thread partial sums near 32 float32 registers: 4 warps x 32 threads x 32.
    block_k = 1024 if weight_bytes == 1 else 512
    block_n = max(1, 4 // rows)
    return GemvTile(block_n=block_n, block_k=min(block_k, max(16, next_pow2(k))), num_warps=4)


def _gemv_kernel(
    X,
    W,
    WS,
    B,
    Out,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,
    BITS: tl.constexpr,
    SCALE_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    w_ptrs = W + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    acc = tl.full([BLOCK_M, BLOCK_N, BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:  # N % BLOCK_N == 0 and K % BLOCK_K == 0: unmasked, vectorised weight loads
            w = tl.load(w_ptrs + k0)
            x = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
        else:
            k_ok = k0 + ks < K
            w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if BITS:  # W holds e4m3 bytes as int8: sign to bit 31, magnitude to bits 20-26
            wi = w.to(tl.int32)
            wf = ((wi << 20) & -2014314496).to(tl.float32, bitcast=True)  # 0x87F00000
        else:
            wf = w.to(tl.float32)
        acc += x.to(tl.float32)[:, None, :] * wf[None, :, :]
    out = tl.reduce(acc, 2, tl.standard._sum_combine)
    if HAS_SCALE:
        out = out * (tl.load(WS + cols, mask=col_ok, other=0.0) * SCALE_MUL)[None, :]
    if HAS_BIAS:
        out += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = Out + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


GEMV_KERNEL = dual_kernel(_gemv_kernel)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tile: GemvTile | None = None,
) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias`` for at most ``GEMV_MAX_M`` rows.

    Args:
        x: [M, K] activations, the last dim contiguous.
        weight: [N, K] row-major weight: FP8 (then ``weight_scale`` is required) or a float dtype.
        weight_scale: [N] float32 per-output-channel scales, or None for an unscaled weight.
        bias: optional [N] bias.
        tile: launch shape (default: :func:`default_tile`).

    Returns:
        [M, N] in ``x``'s dtype (float32 accumulation).

    Raises:
        ValueError: too many rows, a non-contiguous operand, or an FP8 weight without scales.
    """
    m, k = x.shape
    n = weight.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv takes at most {GEMV_MAX_M} rows, got {m}")
    if x.stride(-1) != 1 or not weight.is_contiguous() or weight.shape[1] != k:
        raise ValueError("gemv needs a K-contiguous x and a contiguous [N, K] weight")
    if weight.element_size() == 1 and weight_scale is None:
        raise ValueError("an FP8 weight needs its per-channel scales")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if tile is None:
        tile = default_tile(m, n, k, weight.element_size())
        if runs_interpreted(x.device):
            tile = GemvTile(block_n=min(tile.block_n, 4), block_k=min(tile.block_k, 32),
                            num_warps=1)  # fmt: skip
    block_k = min(tile.block_k, max(16, next_pow2(k)))
    even = n % tile.block_n == 0 and k % block_k == 0
    bits = tile.widen == "bits" and weight.element_size() == 1
    if bits:
        weight = weight.view(torch.int8)
    GEMV_KERNEL.on(x.device)[(triton.cdiv(n, tile.block_n),)](
        x, weight, weight_scale if weight_scale is not None else x,
        bias if bias is not None else x, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None, EVEN=even, BITS=bits,
        SCALE_MUL=_E4M3_BITS_FACTOR if bits else 1.0,
        BLOCK_M=next_pow2(m), BLOCK_N=tile.block_n, BLOCK_K=block_k, num_warps=tile.num_warps,
    )  # fmt: skip
    return out
