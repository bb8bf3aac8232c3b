"""KV store: scatter the new tokens' K and V rows into their pool slots in one launch.

Into an FP8 pool the kernel divides by the layer's scales, saturates to +-448 and rounds to
nearest-even e4m3 on the way (compiled runs only: the interpreter's float32 -> e4m3 cast rounds
wrongly across binade boundaries, so on CPU the wrapper quantizes with torch first and the
kernel only copies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kvcache.pool import FP8_KV_DTYPE, FP8_KV_MAX, quantize_kv
from radixlm.model.attention.triton_kernels._dispatch import (
    dual_kernel,
    next_pow2,
    runs_interpreted,
)


def _store_kv_kernel(
    K,
    V,
    K_buf,
    V_buf,
    loc,
    num_tokens,
    k_scale,
    v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kbs,
    stride_kbh,
    stride_vbs,
    stride_vbh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TOKENS_PER_PROGRAM: tl.constexpr,
    QUANT: tl.constexpr,
    FP8_LIMIT: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HEAD_DIM)
    first = tl.program_id(0) * TOKENS_PER_PROGRAM
    for i in range(TOKENS_PER_PROGRAM):
        t = first + i
        if t < num_tokens:
            slot = tl.load(loc + t).to(tl.int64)
            t64 = t.to(tl.int64)
            k = tl.load(K + t64 * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
            v = tl.load(V + t64 * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
            if QUANT:
                k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -FP8_LIMIT), FP8_LIMIT)
                v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -FP8_LIMIT), FP8_LIMIT)
                k = k.to(K_buf.dtype.element_ty)
                v = v.to(V_buf.dtype.element_ty)
            k_dst = K_buf + slot * stride_kbs + heads[:, None] * stride_kbh + dims[None, :]
            v_dst = V_buf + slot * stride_vbs + heads[:, None] * stride_vbh + dims[None, :]
            tl.store(k_dst, k, mask=mask)
            tl.store(v_dst, v, mask=mask)


STORE_KV_KERNEL = dual_kernel(_store_kv_kernel)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
    tokens_per_program: int = 4,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write ``k``/``v`` rows into the pool at ``loc``.

    Args:
        k: [T, num_kv_heads, head_dim] new keys (the last dim contiguous).
        v: [T, num_kv_heads, head_dim] new values (the last dim contiguous).
        k_buffer: [slots, num_kv_heads, head_dim] one layer's key pool.
        v_buffer: [slots, num_kv_heads, head_dim] one layer's value pool.
        loc: [T] integer slot of each token.
            K/V in another dtype than the pool's are cast to it (round to nearest) first.
        tokens_per_program: rows each program copies (amortizes index math on large T).
        k_scale: an FP8 pool stores K / k_scale (1.0 for other pools).
        v_scale: an FP8 pool stores V / v_scale.
    """
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_last_dim_contiguous(k, v, k_buffer, v_buffer)
    fp8 = k_buffer.dtype == FP8_KV_DTYPE
    quant_in_kernel = fp8 and not runs_interpreted(k.device)
    if fp8 and not quant_in_kernel:
        k, v = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
    elif not fp8:
        # Cast here rather than in the kernel: the interpreter truncates to bfloat16 where the
        # GPU rounds to nearest, and the pool must hold the same values on both.
        k, v = k.to(k_buffer.dtype), v.to(v_buffer.dtype)
    grid = (triton.cdiv(num_tokens, tokens_per_program),)
    block_h = next_pow2(num_heads)
    block_d = next_pow2(head_dim)
    STORE_KV_KERNEL.on(k.device)[grid](
        k, v, k_buffer, v_buffer, loc, num_tokens, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        TOKENS_PER_PROGRAM=tokens_per_program, QUANT=quant_in_kernel, FP8_LIMIT=FP8_KV_MAX,
        num_warps=_store_warps(block_h * block_d),
    )  # fmt: skip


def _store_warps(elements: int) -> int:
    # One 16-byte access per thread per row covers 8 bf16 elements.
    return max(1, min(8, elements // 256))


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the head dimension must be contiguous, got strides {t.stride()}")
