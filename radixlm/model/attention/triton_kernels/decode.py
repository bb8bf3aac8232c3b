"""Decode attention over the paged pool, split-K (flash-decoding).

Stage 1 runs on a grid of (batch, kv_heads, num_splits). Each program takes all query heads of
one KV head (GQA: K/V gathered once, reused by the group; rows padded to 16 for the tensor
cores) and one contiguous range of the sequence, and writes the partial output (already divided
by its softmax sum) and its log-sum-exp. The ranges come from the sequence length inside the
kernel, so the grid depends on shapes only: the launch can be captured in a CUDA graph and
replayed for any sequence lengths. Stage 2, on a grid of (batch, q_heads), merges the splits.
With ``DecodeConfig.fused_merge`` the last stage-1 program of each (sequence, KV head) merges
instead (an atomic counter finds it); measured slower on an H100, so off by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixlm.model.attention.triton_kernels._dispatch import (
    dual_kernel,
    next_pow2,
    runs_interpreted,
)

LOG2_E = 1.4426950408889634


def _decode_split_kernel(
    Q,
    K_buf,
    V_buf,
    Mid_O,
    Mid_LSE,
    Counters,
    Out,
    kv_indptr,
    kv_indices,
    qk_scale,
    v_scale,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_start = tl.load(kv_indptr + b).to(tl.int64)
    seq_len = (tl.load(kv_indptr + b + 1) - kv_start).to(tl.int32)
    lo = 0
    if SLIDING_WINDOW > 0:
        lo = tl.maximum(seq_len - SLIDING_WINDOW, 0)
    span = seq_len - lo
    split_len = (span + NUM_SPLITS - 1) // NUM_SPLITS
    split_len = (split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    split_len = tl.maximum(split_len, MIN_SPLIT_LEN)
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    head = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    if start >= end:
        if FUSED_MERGE and span <= 0 and split == 0:
            # An empty (padded) row has no split to merge: write zeros, not garbage.
            o_ptrs = Out + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + dims[None, :]
            zeros = tl.full([ROWS, BLOCK_D], 0.0, tl.float32).to(Out.dtype.element_ty)
            tl.store(o_ptrs, zeros, mask=row_ok[:, None] & dim_ok[None, :])
        return

    q_ptrs = Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.full([ROWS], 0.0, tl.float32)
    acc = tl.full([ROWS, BLOCK_D], 0.0, tl.float32)
    cols = tl.arange(0, BLOCK_N)
    k_head = K_buf + kv_head * stride_kh
    v_head = V_buf + kv_head * stride_vh
    for n_start in range(start, end, BLOCK_N):
        pos = n_start + cols
        pos_ok = pos < end
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
        qk = tl.where(pos_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # Layout of the scratch: [batch, q_heads, NUM_SPLITS, BLOCK_D] and [batch, q_heads, NUM_SPLITS].
    mid_row = (b * GROUP * tl.num_programs(1) + head).to(tl.int64) * NUM_SPLITS + split
    l_safe = tl.where(row_ok, l_i, 1.0)
    tl.store(
        Mid_O + mid_row[:, None] * BLOCK_D + dims[None, :],
        acc * (v_scale / l_safe)[:, None],
        mask=row_ok[:, None],
    )
    tl.store(Mid_LSE + mid_row, m_i + tl.log2(l_safe), mask=row_ok)

    if FUSED_MERGE:
        # The last split of this (sequence, KV head) to finish merges all of them, saving the
        # second launch. The barrier orders every thread's stores before the release.
        tl.debug_barrier()
        counter = Counters + b * tl.num_programs(1) + kv_head
        ticket = tl.atomic_add(counter, 1, sem="acq_rel")
        used = (span + split_len - 1) // split_len
        if ticket == used - 1:
            tl.store(counter, 0)  # ready for the next launch (CUDA-graph replays)
            splits = tl.arange(0, SPLITS_PAD)
            split_ok = splits < used
            first_row = (b * GROUP * tl.num_programs(1) + kv_head * GROUP).to(tl.int64)
            for g in tl.static_range(GROUP):  # unrolled: every head's loads in flight at once
                base = (first_row + g) * NUM_SPLITS
                # .cg: read what the other programs wrote from L2, never a stale L1 line.
                lse = tl.load(Mid_LSE + base + splits, mask=split_ok, other=float("-inf"),
                              cache_modifier=".cg")  # fmt: skip
                weight = tl.exp2(lse - tl.reduce(lse, 0, tl.standard._elementwise_max))
                weight = tl.where(split_ok, weight, 0.0)
                part = tl.load(Mid_O + (base + splits)[:, None] * BLOCK_D + dims[None, :],
                               mask=split_ok[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
                total = tl.reduce(weight, 0, tl.standard._sum_combine)
                out = tl.reduce(part * weight[:, None], 0, tl.standard._sum_combine) / total
                o_ptrs = Out + b.to(tl.int64) * stride_ob + (kv_head * GROUP + g) * stride_oh
                tl.store(o_ptrs + dims, out.to(Out.dtype.element_ty), mask=dim_ok)


def _decode_merge_kernel(
    Mid_O,
    Mid_LSE,
    Out,
    kv_indptr,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)
    lo = 0
    if SLIDING_WINDOW > 0:
        lo = tl.maximum(seq_len - SLIDING_WINDOW, 0)
    span = seq_len - lo
    split_len = (span + NUM_SPLITS - 1) // NUM_SPLITS
    split_len = (split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    split_len = tl.maximum(split_len, MIN_SPLIT_LEN)
    used = (span + split_len - 1) // split_len

    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < used
    dims = tl.arange(0, BLOCK_D)
    base = (b * tl.num_programs(1) + head).to(tl.int64) * NUM_SPLITS
    lse = tl.load(Mid_LSE + base + splits, mask=split_ok, other=float("-inf"))
    lse_max = tl.reduce(lse, 0, tl.standard._elementwise_max)
    part = tl.load(
        Mid_O + (base + splits)[:, None] * BLOCK_D + dims[None, :],
        mask=split_ok[:, None],
        other=0.0,
    )
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no used split: all weights 0
    weight = tl.exp2(lse - lse_max)
    # A sequence of length 0 (a padded row) has no used split: write zeros, not NaN.
    total = tl.reduce(weight, 0, tl.standard._sum_combine)
    acc = tl.reduce(part * weight[:, None], 0, tl.standard._sum_combine)
    total = tl.where(total > 0, total, 1.0)
    out = acc / total
    o_ptrs = Out + b.to(tl.int64) * stride_ob + head * stride_oh + dims
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=dims < HEAD_DIM)


DECODE_SPLIT_KERNEL = dual_kernel(_decode_split_kernel)
DECODE_MERGE_KERNEL = dual_kernel(_decode_merge_kernel)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernels.

    Attributes:
        block_n: KV positions per inner step.
        min_split_len: no split is shorter than this (short sequences use fewer splits; the
            programs of the unused splits exit at once).
        num_warps: warps per stage-1 program.
        num_stages: software-pipelining depth of the stage-1 KV loop.
        target_programs: stage-1 programs to aim for when choosing the split count.
        max_splits: upper bound on the split count.
        fused_merge: the last stage-1 program of each (sequence, KV head) merges the splits
            (found through an atomic counter) instead of a second launch.
    """

    block_n: int = 128
    min_split_len: int = 128
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 528
    max_splits: int = 64
    fused_merge: bool = False


class DecodeScratch:
    """Stage-1 partial results and merge counters, shared by every layer and every batch.

    The buffers only grow (to the largest decode shape asked for) and are never replaced
    otherwise, so a CUDA graph captured at one batch size keeps valid pointers while other batch
    sizes run; capture the largest batch first (or ``views`` it once) so no capture sees a
    buffer that a later one replaces. The counters start at zero and every fused merge leaves
    them at zero again.

    Args:
        device: where the buffers live.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        # Nothing is allocated until the first decode (a backend may be built before CUDA is up).
        self._partial_out: torch.Tensor | None = None
        self._partial_lse: torch.Tensor | None = None
        self._counters: torch.Tensor | None = None

    def views(
        self, batch: int, q_heads: int, kv_heads: int, num_splits: int, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contiguous views for one decode shape, growing the buffers if they are too small.

        Returns:
            partial_out [batch, q_heads, num_splits, padded head_dim] float32,
            partial_lse [batch, q_heads, num_splits] float32,
            counters [batch, kv_heads] int32.
        """
        out_shape = (batch, q_heads, num_splits, _block_d(head_dim))
        lse_shape, counter_shape = out_shape[:3], (batch, kv_heads)
        self._partial_out = self._grown(self._partial_out, out_shape, torch.float32)
        self._partial_lse = self._grown(self._partial_lse, lse_shape, torch.float32)
        self._counters = self._grown(self._counters, counter_shape, torch.int32)
        return (
            self._partial_out[: math.prod(out_shape)].view(out_shape),
            self._partial_lse[: math.prod(lse_shape)].view(lse_shape),
            self._counters[: math.prod(counter_shape)].view(counter_shape),
        )

    def _grown(self, buf: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if buf is not None and buf.numel() >= math.prod(shape):
            return buf
        # Zeros: the counters must start at zero (the float buffers are always written first).
        return torch.zeros(math.prod(shape), dtype=dtype, device=self.device)


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def choose_num_splits(batch: int, num_kv_heads: int, config: DecodeConfig) -> int:
    """Split count from the batch shape only, so a captured launch stays valid for any lengths.

    Args:
        batch: sequences in the batch.
        num_kv_heads: KV heads per layer.
        config: target program count and split bound.

    Returns:
        A power of two in [1, config.max_splits].
    """
    wanted = triton.cdiv(config.target_programs, max(1, batch * num_kv_heads))
    return min(config.max_splits, next_pow2(wanted))


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    scratch: DecodeScratch | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per sequence attends to all of its sequence's slots.

    Args:
        q: [B, num_q_heads, head_dim] one query per sequence.
        k_buffer: [slots, num_kv_heads, head_dim] one layer's key pool (new K already stored).
        v_buffer: [slots, num_kv_heads, head_dim] one layer's value pool.
        kv_indptr: [B+1] int32 offsets of each sequence's slots in ``kv_indices``.
        kv_indices: int64 slots of every token of every sequence.
        scale: softmax scale.
        num_splits: split count; default from the batch shape (``choose_num_splits``).
        scratch: stage-1 buffers to reuse (grown if too small); allocated if missing.
        out: optional [B, num_q_heads, head_dim] output tensor.
        config: launch shape; default suits the device.
        sliding_window: if set, the query at position p sees only positions (p - window, p].
        k_scale: stored K x k_scale = real K (an FP8 pool's per-layer scale; else 1.0).
        v_scale: the same for V.

    Returns:
        [B, num_q_heads, head_dim] attention output in ``q``'s dtype.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    config = config or default_decode_config(q.device)
    fused_merge = config.fused_merge
    num_splits = num_splits or choose_num_splits(batch, num_kv_heads, config)
    scratch = scratch or DecodeScratch(q.device)
    partial_out, partial_lse, counters = scratch.views(
        batch, num_q_heads, num_kv_heads, num_splits, head_dim
    )
    group = num_q_heads // num_kv_heads
    block_d = _block_d(head_dim)
    # The merge recomputes each split's range, so both stages must agree on these.
    shared = dict(
        BLOCK_N=config.block_n, NUM_SPLITS=num_splits, SPLITS_PAD=next_pow2(num_splits),
        MIN_SPLIT_LEN=config.min_split_len, SLIDING_WINDOW=sliding_window or 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d,
    )  # fmt: skip
    DECODE_SPLIT_KERNEL.on(q.device)[(batch, num_kv_heads, num_splits)](
        q, k_buffer, v_buffer, partial_out, partial_lse, counters, out,
        kv_indptr, kv_indices, scale * k_scale * LOG2_E, v_scale, q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1), GROUP=group, ROWS=max(16, next_pow2(group)),
        FUSED_MERGE=fused_merge, KV_FP8=k_buffer.dtype == torch.float8_e4m3fn,
        **_dot_flags(q.dtype, q.device),
        num_warps=config.num_warps, num_stages=config.num_stages, **shared,
    )  # fmt: skip
    if not fused_merge:
        DECODE_MERGE_KERNEL.on(q.device)[(batch, num_q_heads)](
            partial_out, partial_lse, out, kv_indptr, out.stride(0), out.stride(1),
            num_warps=_merge_warps(block_d), **shared,
        )  # fmt: skip
    return out


def _merge_warps(block_d: int) -> int:
    return 1 if block_d <= 64 else 2


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict[str, bool]:
    # The interpreter's bfloat16 dot is wrong (it multiplies the raw bits), so interpreted
    # bfloat16 runs upcast to float32; float32 dots are exact (IEEE), not TF32.
    upcast = dtype == torch.bfloat16 and runs_interpreted(device)
    return {"IEEE": dtype == torch.float32 or upcast, "UPCAST": upcast}


def default_decode_config(device: torch.device) -> DecodeConfig:
    """Short splits for the CPU interpreter (so tests cross split boundaries), tuned for GPU."""
    if device.type == "cpu":
        return DecodeConfig(block_n=16, min_split_len=16, num_warps=1, num_stages=1,
                            target_programs=16, max_splits=8)  # fmt: skip
    return DecodeConfig()
