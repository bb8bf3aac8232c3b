"""Triton kernels of the FP8 linear layer: per-token activation quantization and a small-M GEMM.

``quantize_per_token`` reads each row once for its amax and once more to scale and cast, in one
launch (the torch version is five). ``fp8_small_m_gemm`` is the decode-time product for at most a
few rows: the FP8 weight tile is widened to the activation dtype in registers (exact: every e4m3
value is a bfloat16/float16 value) and multiplied on the tensor cores with the rows padded to 16,
accumulating in float32; the per-channel scale is applied once at the end. Each program owns
``BLOCK_N`` output channels over the whole K, so nothing is reduced across programs.

Neither kernel reads anything back to the host, so both can be captured in a CUDA graph.

The GEMM also runs under the Triton interpreter on CPU tensors (tested there at tiny sizes): the
interpreter widens FP8 exactly. The quantization kernel does not: the interpreter's float32 ->
e4m3 cast rounds wrongly across binade boundaries (31.9 becomes 16), so on CPU
``quantize_per_token`` runs the torch reference instead and the kernel is tested on the GPU only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from radixlm.model.attention.triton_kernels._dispatch import (
    dual_kernel,
    next_pow2,
    runs_interpreted,
)
from radixlm.model.layers.fp8 import FP8_DTYPE, FP8_MAX, MIN_AMAX, quantize_rows

QUANT_BLOCK = 4096


def _quant_rows_kernel(
    X,
    Q,
    S,
    K,
    stride_x,
    stride_q,
    FP8_LIMIT: tl.constexpr,
    MIN_AMAX_: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, K, BLOCK):
        ok = start + cols < K
        x = tl.load(X + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    top = tl.reduce(amax, 0, tl.standard._elementwise_max)
    scale = tl.maximum(top, MIN_AMAX_) / FP8_LIMIT
    for start in range(0, K, BLOCK):
        ok = start + cols < K
        x = tl.load(X + row * stride_x + start + cols, mask=ok, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_LIMIT), FP8_LIMIT)
        tl.store(Q + row * stride_q + start + cols, q.to(Q.dtype.element_ty), mask=ok)
    tl.store(S + row, scale)


QUANT_ROWS_KERNEL = dual_kernel(_quant_rows_kernel)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) FP8 quantization with scale ``amax(|row|) / 448``.

    Args:
        x: [M, K] activations, the last dim contiguous.

    Returns:
        (FP8 [M, K], float32 scales [M, 1]).
    """
    if runs_interpreted(x.device):
        return quantize_rows(x)
    rows, k = x.shape
    q = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    block = min(QUANT_BLOCK, next_pow2(k))
    QUANT_ROWS_KERNEL.on(x.device)[(rows,)](
        x, q, scale, k, x.stride(0), q.stride(0), FP8_LIMIT=FP8_MAX, MIN_AMAX_=MIN_AMAX,
        BLOCK=block, num_warps=max(1, min(8, block // 256)),
    )  # fmt: skip
    return q, scale


def _small_m_gemm_kernel(
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
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    OPERANDS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = W + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k_ok = k0 + ks < K
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if OPERANDS == 0:  # float32 (exact products; the interpreter and float32 models)
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif OPERANDS == 1:  # the activation's dtype
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:  # float16: e4m3 -> f16 is one conversion per pair (bf16: via f32)
            acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
    scale = tl.load(WS + cols, mask=col_ok, other=0.0)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = Out + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


SMALL_M_GEMM_KERNEL = dual_kernel(_small_m_gemm_kernel)


def fp8_small_m_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    operands: str = "input",
) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias`` for few rows (W8A16, fp32 accumulation).

    Args:
        x: [M, K] activations (M <= 64; meant for M <= 16), the last dim contiguous.
        weight: [N, K] FP8 weight, row-major.
        weight_scale: [N] float32 per-channel scales.
        bias: optional [N] bias.
        block_n: output channels per program (default by device).
        block_k: K step (default by device).
        operands: what the tensor cores multiply: ``"input"`` (the activation's dtype) or
            ``"float16"`` (the activation rounded to fp16: cheaper to widen FP8 to, but only for
            activations within fp16's range, 65504). Under the interpreter: float32 always.
            (FP8 x FP8 at 16 rows is no option: sm90 multiplies FP8 only in wgmma, 64 rows and
            up, which :func:`fp8_swap_ab_gemm` gets by putting the weight on that side.)

    Returns:
        [M, N] in ``x``'s dtype.

    Raises:
        ValueError: more than 64 rows or a non-contiguous operand.
    """
    m, k, n, out = _small_m_operands("fp8_small_m_gemm", x, weight, 64)
    if m == 0:
        return out
    interpreted = runs_interpreted(x.device)
    if block_n is None:
        # Each program streams BLOCK_N rows of the weight: keep at least two per SM busy.
        wide_enough = not interpreted and triton.cdiv(n, 32) >= 2 * _num_sms(x.device.index)
        block_n = 32 if wide_enough else 16
    block_k = block_k or (32 if interpreted else 256)
    grid = (triton.cdiv(n, block_n),)
    if interpreted or x.dtype == torch.float32:
        mode = 0
    else:
        mode = {"input": 1, "float16": 2}[operands]
    SMALL_M_GEMM_KERNEL.on(x.device)[grid](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=max(16, next_pow2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        NUM_STAGES=1 if interpreted else 4, OPERANDS=mode, num_warps=4,
    )  # fmt: skip
    return out
    return out


def _small_m_operands(
    name: str, x: torch.Tensor, weight: torch.Tensor, max_rows: int
) -> tuple[int, int, int, torch.Tensor]:
    """Check a small-M product's operands; returns (M, K, N, the empty [M, N] output)."""
    m, k = x.shape
    if m > max_rows:
        raise ValueError(f"{name} is for at most {max_rows} rows, got {m}")
    if x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError(f"{name} needs a K-contiguous x and a contiguous weight")
    n = weight.shape[0]
    return m, k, n, torch.empty((m, n), dtype=x.dtype, device=x.device)


@functools.cache
def _num_sms(index: int | None) -> int:
    return torch.cuda.get_device_properties(index or 0).multi_processor_count


def _swap_ab_kernel(
    XQ,
    XS,
    W,
    WS,
    B,
    Out,
    Partial,
    Locks,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    row_ok = rows < M
    # This program's share of K, in whole BLOCK_K steps.
    k_per = (K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    w_ptrs = W + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    x_ptrs = XQ + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        k_ok = k0 + ks < k_hi
        w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # The weight is the MMA's M side (BLOCK_N >= 64 channels), the few rows its N side:
        # FP8 x FP8 on the tensor cores, nothing widened.
        if IEEE:
            acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(x))
    last = row_ok[None, :] & col_ok[:, None]  # where this program writes the output
    if SPLIT_K > 1:
        # Split K: each program leaves its partial sums; the last of a column block to arrive
        # (a counter per block, reset by that program) adds them up and writes the output.
        part = Partial + (pid_k * N + cols)[:, None].to(tl.int64) * BLOCK_M + rows[None, :]
        tl.store(part, acc, mask=col_ok[:, None])
        tl.debug_barrier()
        arrived = tl.atomic_add(Locks + pid_n, 1, sem="acq_rel")
        # As a [BLOCK_N, 1] block (a scalar mask is not accepted everywhere).
        is_last = (tl.full([BLOCK_N, 1], 0, tl.int32) + arrived) == SPLIT_K - 1
        acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
        for s in range(SPLIT_K):
            src = Partial + (s * N + cols)[:, None].to(tl.int64) * BLOCK_M + rows[None, :]
            acc += tl.load(src, mask=col_ok[:, None] & is_last, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(Locks + pid_n, 0, mask=arrived == SPLIT_K - 1)
        last = last & is_last
    out = acc * tl.load(WS + cols, mask=col_ok, other=0.0)[:, None]
    out = out * tl.load(XS + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    o_ptrs = Out + rows[None, :].to(tl.int64) * stride_om + cols[:, None]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=last)


SWAP_AB_KERNEL = dual_kernel(_swap_ab_kernel)
# Split-K arrival counters per device, zero between launches (each launch's last programs
# reset theirs), so launches reuse them and CUDA graphs replay them.
_LOCK_SLOTS = 8192


@functools.cache
def _locks(device: torch.device) -> torch.Tensor:
    return torch.zeros(_LOCK_SLOTS, dtype=torch.int32, device=device)


def fp8_swap_ab_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = 64,
    block_k: int = 256,
    split_k: int = 1,
) -> torch.Tensor:
    """W8A8 for at most 16 rows on FP8 tensor cores: ``(W @ x_fp8.T).T`` with the weight as the
    MMA's 64-or-more-row operand (on sm90 only wgmma multiplies FP8, and it needs that), the
    activation quantized per row first, float32 accumulation; ``split_k`` programs share each
    column block's K and the last one to finish adds their partial sums (one launch).

    Args:
        x: [M, K] activations (M <= 16), the last dim contiguous.
        weight: [N, K] FP8 weight, row-major.
        weight_scale: [N] float32 per-channel scales.
        bias: optional [N] bias.
        block_n: output channels per program (the MMA's M: 64 or 128).
        block_k: K step.
        split_k: programs per column block.

    Returns:
        [M, N] in ``x``'s dtype.

    Raises:
        ValueError: more than 16 rows, a non-contiguous operand, or more column blocks than
            the split-K counters cover.
    """
    m, k, n, out = _small_m_operands("fp8_swap_ab_gemm", x, weight, 16)
    blocks = triton.cdiv(n, block_n)
    if split_k > 1 and blocks > _LOCK_SLOTS:
        raise ValueError(f"{blocks} column blocks exceed the {_LOCK_SLOTS} split-K counters")
    if m == 0:
        return out
    interpreted = runs_interpreted(x.device)
    x_fp8, x_scale = quantize_per_token(x)
    partial = torch.empty((split_k, n, 16) if split_k > 1 else (1,), dtype=torch.float32,
                          device=x.device)  # fmt: skip
    SWAP_AB_KERNEL.on(x.device)[(blocks, split_k)](
        x_fp8, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out,
        partial, _locks(x.device), m, n, k, x_fp8.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_M=16, BLOCK_K=block_k,
        SPLIT_K=split_k, NUM_STAGES=1 if interpreted else 3, IEEE=interpreted, num_warps=4,
    )  # fmt: skip
    return out
