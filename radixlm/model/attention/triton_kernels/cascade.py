"""Cascade (shared-prefix) decode attention: a group's shared prefix is read once, not per member.

Decode attention is bound by reading K/V. When G decode sequences share a prefix of S slots
(the radix cache hands them the same slots), plain decode reads those S slots' K/V G times.
Here the shared prefix is attended once per (group, KV head): the queries of all members x the
query heads of that KV head form the rows of one tile, which streams the shared K/V blocks and
computes scores and the weighted sum as matrix-matrix products (``tl.dot`` with M = members x
GQA group, padded to a power of two >= 16). Each member's own part (its slots after the shared
prefix, at least its query token's) runs through the split-K decode kernel with per-sequence
start offsets, and the decode merge folds the prefix partials in by log-sum-exp, as more splits
of the row. Sequences in no group take the decode kernel unchanged (start offset 0).

Prefix kernel grid: (groups x member chunks, KV heads, prefix splits). A group with more
members than one tile holds is cut into chunks of ``members_per_tile``; chunks past a smaller
group's end exit at once. Splits cut the shared prefix like decode stage 1 cuts a sequence, so
the merge can recompute their ranges from the shared length alone.

Sliding window: not supported here (the backend falls back to plain decode). With a window,
each member sees its own last ``window`` positions, which start at different places for
members of different lengths, so the shared prefix is not one block that all rows see, and a
window shorter than the prefix leaves little of it to share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixlm.model.attention.triton_kernels._dispatch import dual_kernel, next_pow2
from radixlm.model.attention.triton_kernels.decode import (
    LOG2_E,
    DecodeConfig,
    DecodeScratch,
    PrefixPartials,
    _block_d,
    _dot_flags,
    choose_num_splits,
    decode_attention,
    default_decode_config,
)
from radixlm.prefix_groups import PrefixGroups


def _prefix_kernel(
    Q,
    K_buf,
    V_buf,
    Pre_O,
    Pre_LSE,
    kv_indptr,
    kv_indices,
    group_indptr,
    group_rows,
    shared_lens,
    qk_scale,
    v_scale,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    GROUP: tl.constexpr,
    MEMBERS: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    group = tl.program_id(0) // CHUNKS
    chunk = tl.program_id(0) % CHUNKS
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    first = tl.load(group_indptr + group)
    size = tl.load(group_indptr + group + 1) - first
    shared = tl.load(shared_lens + group)
    split_len = (shared + NUM_SPLITS - 1) // NUM_SPLITS
    split_len = (split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    split_len = tl.maximum(split_len, MIN_SPLIT_LEN)
    start = split * split_len
    end = tl.minimum(start + split_len, shared)
    member0 = chunk * MEMBERS
    if (member0 >= size) | (start >= end):
        return

    # Row r of the tile: member r // GROUP of this chunk, query head r % GROUP of this KV head.
    rows = tl.arange(0, ROWS)
    member = rows // GROUP
    row_ok = (member < MEMBERS) & (member0 + member < size)
    seq = tl.load(group_rows + first + member0 + member, mask=row_ok, other=0).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_ptrs = Q + seq[:, None] * stride_qb + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Every member holds the same shared slots: read them from the leader's list.
    leader = tl.load(group_rows + first)
    slot_base = kv_indices + tl.load(kv_indptr + leader).to(tl.int64)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.full([ROWS], 0.0, tl.float32)
    acc = tl.full([ROWS, BLOCK_D], 0.0, tl.float32)
    cols = tl.arange(0, BLOCK_N)
    k_head = K_buf + kv_head * stride_kh
    v_head = V_buf + kv_head * stride_vh
    for n_start in range(start, end, BLOCK_N):
        pos = n_start + cols
        pos_ok = pos < end
        slots = tl.load(slot_base + pos, mask=pos_ok, other=0).to(tl.int64)
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

    # Partials per (sequence, q head, split), the layout the decode merge reads.
    num_q_heads = GROUP * tl.num_programs(1)
    mid_row = (seq * num_q_heads + head) * NUM_SPLITS + split
    l_safe = tl.where(row_ok, l_i, 1.0)
    tl.store(
        Pre_O + mid_row[:, None] * BLOCK_D + dims[None, :],
        acc * (v_scale / l_safe)[:, None],
        mask=row_ok[:, None],
    )
    tl.store(Pre_LSE + mid_row, m_i + tl.log2(l_safe), mask=row_ok)


PREFIX_KERNEL = dual_kernel(_prefix_kernel)


@dataclass(frozen=True)
class CascadeConfig:
    """Launch shape of the shared-prefix kernel.

    Attributes:
        max_rows: most tile rows (members x query heads per KV head); larger groups are cut
            into chunks of ``max_rows // group`` members (at least one).
        block_n: shared-prefix positions per inner step.
        min_split_len: no prefix split is shorter than this.
        target_programs: programs to aim for when choosing the prefix split count.
        max_splits: upper bound on the prefix split count.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the KV loop.
    """

    max_rows: int = 64
    block_n: int = 64
    min_split_len: int = 256
    target_programs: int = 528
    max_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2


def default_cascade_config(device: torch.device) -> CascadeConfig:
    """Small tiles and short splits for the CPU interpreter (so tests cross every boundary)."""
    if device.type == "cpu":
        return CascadeConfig(max_rows=16, block_n=16, min_split_len=16, target_programs=16,
                             max_splits=4, num_warps=1, num_stages=1)  # fmt: skip
    return CascadeConfig()


def prefix_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    groups: PrefixGroups,
    scale: float,
    scratch: DecodeScratch | None = None,
    config: CascadeConfig | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> PrefixPartials:
    """Each group's members attend to the group's shared prefix, read once per KV head.

    Args:
        q: [B, num_q_heads, head_dim] one query per sequence.
        k_buffer / v_buffer: [slots, num_kv_heads, head_dim] one layer's K/V pool.
        kv_indptr: [B+1] int32 offsets of each sequence's slots in ``kv_indices``.
        kv_indices: int64 slots of every token of every sequence.
        groups: the batch's prefix groups.
        scale: softmax scale.
        scratch: where the partials go (grown if too small); allocated if missing.
        config: launch shape; default suits the device.
        k_scale / v_scale: stored K/V x scale = real K/V (an FP8 pool's per-layer scales).

    Returns:
        The partials over each member's positions [0, shared length), for ``decode_attention``.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    config = config or default_cascade_config(q.device)
    scratch = scratch or DecodeScratch(q.device)
    members = max(1, min(groups.max_group_size, config.max_rows // group))
    chunks = triton.cdiv(groups.max_group_size, members)
    programs = groups.num_groups * chunks * num_kv_heads
    num_splits = min(config.max_splits, next_pow2(triton.cdiv(config.target_programs, programs)))
    out, lse = scratch.prefix_views(batch, num_q_heads, num_splits, head_dim)
    PREFIX_KERNEL.on(q.device)[(groups.num_groups * chunks, num_kv_heads, num_splits)](
        q, k_buffer, v_buffer, out, lse, kv_indptr, kv_indices, groups.group_indptr,
        groups.group_rows, groups.shared_lens, scale * k_scale * LOG2_E, v_scale,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        GROUP=group, MEMBERS=members, ROWS=max(16, next_pow2(members * group)), CHUNKS=chunks,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits, MIN_SPLIT_LEN=config.min_split_len,
        KV_FP8=k_buffer.dtype == torch.float8_e4m3fn, **_dot_flags(q.dtype, q.device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return PrefixPartials(out, lse, num_splits, config.block_n, config.min_split_len)


def cascade_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    groups: PrefixGroups,
    scale: float,
    num_splits: int | None = None,
    scratch: DecodeScratch | None = None,
    out: torch.Tensor | None = None,
    decode_config: DecodeConfig | None = None,
    cascade_config: CascadeConfig | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Decode attention equal to ``decode_attention``, reading each shared prefix once per group.

    Args:
        q: [B, num_q_heads, head_dim] one query per sequence.
        k_buffer / v_buffer: [slots, num_kv_heads, head_dim] one layer's K/V pool.
        kv_indptr: [B+1] int32 offsets of each sequence's slots in ``kv_indices``.
        kv_indices: int64 slots of every token of every sequence.
        groups: the batch's prefix groups (``find_prefix_groups`` over the same slot lists).
        scale: softmax scale.
        num_splits: split count of the own-part decode; default from the batch shape.
        scratch: buffers to reuse (grown if too small); allocated if missing.
        out: optional [B, num_q_heads, head_dim] output tensor.
        decode_config: launch shape of the own-part decode and the merge.
        cascade_config: launch shape of the shared-prefix kernel.
        k_scale / v_scale: stored K/V x scale = real K/V (an FP8 pool's per-layer scales).

    Returns:
        [B, num_q_heads, head_dim] attention output in ``q``'s dtype.
    """
    out = torch.empty_like(q) if out is None else out
    if q.shape[0] == 0:
        return out
    scratch = scratch or DecodeScratch(q.device)
    if groups.num_groups == 0:
        prefix = None
    else:
        prefix = prefix_attention(q, k_buffer, v_buffer, kv_indptr, kv_indices, groups, scale,
                                  scratch, cascade_config, k_scale, v_scale)  # fmt: skip
    decode_config = decode_config or default_decode_config(q.device)
    num_splits = num_splits or choose_num_splits(q.shape[0], k_buffer.shape[1], decode_config)
    return decode_attention(
        q, k_buffer, v_buffer, kv_indptr, kv_indices, scale, num_splits=num_splits,
        scratch=scratch, out=out, config=decode_config,
        kv_begin=groups.suffix_start if prefix is not None else None, prefix=prefix,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
