"""Extend attention over the paged pool: new tokens attend causally to prefix + themselves.

One program owns ``BLOCK_M`` new tokens of one sequence and all ``GROUP`` query heads that
share one KV head, so every K/V tile gathered from the pool is reused by the whole group
(GQA). Its rows are (token, head-in-group) pairs. The KV loop runs in two phases: positions
every row of the tile can see (no mask), then the diagonal band (causal mask).
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


def _extend_kernel(
    Q,
    K_buf,
    V_buf,
    Out,
    qo_indptr,
    kv_indptr,
    kv_indices,
    qk_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    m_start = tl.program_id(2) * BLOCK_M
    q_start = tl.load(qo_indptr + seq)
    q_len = tl.load(qo_indptr + seq + 1) - q_start
    if m_start >= q_len:
        return
    kv_start = tl.load(kv_indptr + seq).to(tl.int64)
    seq_len = (tl.load(kv_indptr + seq + 1) - kv_start).to(tl.int32)
    prefix_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    tok = m_start + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_ptrs = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptrs + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = prefix_len + tok

    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M * GROUP_PAD], 0.0, tl.float32)
    acc = tl.full([BLOCK_M * GROUP_PAD, BLOCK_D], 0.0, tl.float32)
    cols = tl.arange(0, BLOCK_N)
    k_head = K_buf + kv_head * stride_kh
    v_head = V_buf + kv_head * stride_vh

    # Phase 1: KV positions below the tile's first query position are visible to every row
    # (with a sliding window: not below the window of the tile's first row, masked per row).
    full_end = (prefix_len + m_start) // BLOCK_N * BLOCK_N
    lo = 0
    if SLIDING_WINDOW > 0:
        lo = tl.maximum(prefix_len + m_start - SLIDING_WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    for n_start in range(lo, full_end, BLOCK_N):
        pos = n_start + cols
        slots = tl.load(kv_indices + kv_start + pos).to(tl.int64)
        k = tl.load(k_head + slots[:, None] * stride_ks + dims[None, :], mask=dim_ok[None, :])
        v = tl.load(v_head + slots[:, None] * stride_vs + dims[None, :], mask=dim_ok[None, :])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        elif KV_FP8:
            # FP8 -> the query dtype is exact (every e4m3 value is a bf16/fp16/fp32 value).
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale
        if SLIDING_WINDOW > 0:
            qk = tl.where(pos[None, :] > q_pos[:, None] - SLIDING_WINDOW, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
        # A row can see nothing of a block (window, or rows past the sequence): keep exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # Phase 2: the diagonal band, masked causally per row.
    band_end = tl.minimum(seq_len, prefix_len + m_start + BLOCK_M)
    for n_start in range(full_end, band_end, BLOCK_N):
        pos = n_start + cols
        pos_ok = pos < band_end
        slots = tl.load(kv_indices + kv_start + pos, mask=pos_ok, other=0).to(tl.int64)
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_head + slots[:, None] * stride_ks + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_head + slots[:, None] * stride_vs + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        elif KV_FP8:
            # FP8 -> the query dtype is exact (every e4m3 value is a bf16/fp16/fp32 value).
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        if SLIDING_WINDOW > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - SLIDING_WINDOW)
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # Rows past the sequence's new tokens are not stored; keep their division finite.
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc * (v_scale / l_i)[:, None]
    o_ptrs = Out + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(
        o_ptrs + dims[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :]
    )


EXTEND_KERNEL = dual_kernel(_extend_kernel)

LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class ExtendConfig:
    """Launch shape of the extend kernel.

    Attributes:
        block_rows: query rows per program (tokens x padded group), a power of two >= 16.
        block_n: KV positions per inner step, a power of two >= 16.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the KV loop.
    """

    block_rows: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_extend_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    config: ExtendConfig | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its prefix and themselves.

    Args:
        q: [T, num_q_heads, head_dim] queries of the new tokens, sequences concatenated.
        k_buffer: [slots, num_kv_heads, head_dim] one layer's key pool (new K already stored).
        v_buffer: [slots, num_kv_heads, head_dim] one layer's value pool.
        qo_indptr: [B+1] int32 offsets of each sequence's rows in ``q``.
        kv_indptr: [B+1] int32 offsets of each sequence's slots in ``kv_indices``.
        kv_indices: int64 slots of every token of every sequence (prefix, then new tokens).
        max_extend_len: the largest number of new tokens of one sequence (a host int).
        scale: softmax scale (usually head_dim ** -0.5).
        out: optional [T, num_q_heads, head_dim] output tensor.
        config: launch shape; default by device and launch size (``default_extend_config``).
        sliding_window: if set, a token at position p sees only positions (p - window, p].
        k_scale: stored K x k_scale = real K (an FP8 pool's per-layer scale; else 1.0).
        v_scale: the same for V.

    Returns:
        [T, num_q_heads, head_dim] attention output in ``q``'s dtype.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    out = torch.empty_like(q) if out is None else out
    batch = qo_indptr.shape[0] - 1
    if num_tokens == 0 or batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    group_pad = next_pow2(group)
    if config is None:
        row_blocks = triton.cdiv(max_extend_len, max(1, 128 // group_pad))
        config = default_extend_config(q.device, batch * num_kv_heads * row_blocks,
                                       q.element_size())  # fmt: skip
    block_m = max(1, config.block_rows // group_pad)
    grid = (batch, num_kv_heads, triton.cdiv(max_extend_len, block_m))
    EXTEND_KERNEL.on(q.device)[grid](
        q, k_buffer, v_buffer, out, qo_indptr, kv_indptr, kv_indices,
        scale * k_scale * LOG2_E, v_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=config.block_n, **_dot_flags(q.dtype, q.device),
        SLIDING_WINDOW=sliding_window or 0, KV_FP8=k_buffer.dtype == torch.float8_e4m3fn,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict[str, bool]:
    # The interpreter's bfloat16 dot is wrong (it multiplies the raw bits), so interpreted
    # bfloat16 runs upcast to float32; float32 dots are exact (IEEE), not TF32.
    upcast = dtype == torch.bfloat16 and runs_interpreted(device)
    return {"IEEE": dtype == torch.float32 or upcast, "UPCAST": upcast}


# Measured on an H100 (docs/benchmarks.md): with fewer programs than SMs to fill (one sequence),
# large tiles and 8 warps win; with many programs, 64-wide KV steps and 4 warps (more of them
# resident per SM, less work wasted on the causal diagonal) win.
WIDE_EXTEND = ExtendConfig(block_rows=128, block_n=128, num_warps=8, num_stages=3)
NARROW_EXTEND = ExtendConfig(block_rows=128, block_n=64, num_warps=4, num_stages=3)
CPU_EXTEND = ExtendConfig(block_rows=16, block_n=16, num_warps=1, num_stages=1)
# float32 tiles take twice the shared memory: at head_dim 128 the 16-bit shapes ask for 257 KB
# and more against the H200's 227 KB, so float32 runs narrower and less deeply pipelined.
FLOAT32_EXTEND = ExtendConfig(block_rows=64, block_n=32, num_warps=4, num_stages=2)


def default_extend_config(
    device: torch.device, num_programs: int | None = None, element_size: int = 2
) -> ExtendConfig:
    """Small tiles for the CPU interpreter (fast to emulate); on the GPU, by launch size.

    Args:
        device: where the tensors live.
        num_programs: the launch's program count (batch x KV heads x row blocks of 128 rows);
            unknown: assume a large launch.
        element_size: bytes per query element (4: float32, which needs smaller tiles).

    Returns:
        The launch shape.
    """
    if runs_interpreted(device):
        return CPU_EXTEND
    if element_size >= 4:
        return FLOAT32_EXTEND
    if num_programs is None:
        return NARROW_EXTEND
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return WIDE_EXTEND if num_programs < 2 * num_sms else NARROW_EXTEND
