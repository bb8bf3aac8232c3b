"""Fused Triton kernels for the decoder's elementwise layers: (add +) RMSNorm, SiLU-and-mul, rotary.

The torch versions in norm.py, activation.py and rotary.py launch a chain of small kernels each
(about 35 per decoder layer: pow, mean, rsqrt, casts, cat, neg, ...); at decode batch sizes every
one of them costs a few microseconds even replayed from a CUDA graph. Each kernel here reads its
inputs once and writes its outputs once, in one launch.

Numerics follow the torch path (itself HF's): float32 arithmetic, and a rounding to the activation
dtype wherever the torch path rounds an intermediate (the residual sum, the normalised row before
the weight multiply, silu(gate) before the multiply, each rotary product before the sum). In
float32 every rounding is a no-op; in bf16/fp16 results agree with the torch path to within a unit
in the last place (the sums are reduced in another order).

No function reads anything back to the host: grids and block shapes come from tensor shapes alone,
so every call can be captured in a CUDA graph. CPU tensors run the same kernel bodies under the
Triton interpreter (see ``radixlm.model.attention.triton_kernels._dispatch``, which also explains
why the bodies call no ``@jit`` helper such as ``tl.sum`` or ``tl.sigmoid``).
"""

from __future__ import annotations

import torch
import triton.language as tl

from radixlm.model.attention.triton_kernels._dispatch import dual_kernel, next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Widest row slice one norm program holds in registers; longer rows are walked in chunks.
MAX_NORM_BLOCK = 8192
# Elements one norm program covers when rows are short (Qwen3's per-head q/k norm: 128).
NORM_PROGRAM_ELEMENTS = 2048
SILU_BLOCK = 1024


def _rms_norm_kernel(
    X,
    R,
    W,
    Out,
    ResOut,
    num_rows,
    heads,
    eps,
    stride_xt,
    stride_xh,
    stride_rt,
    stride_rh,
    stride_ot,
    stride_oh,
    stride_st,
    stride_sh,
    DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # A row is (token t, head h): 2-D inputs pass heads=1, so h is always 0 there.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    t = (rows // heads).to(tl.int64)
    h = (rows % heads).to(tl.int64)
    x_row = X + t * stride_xt + h * stride_xh
    r_row = R + t * stride_rt + h * stride_rh
    o_row = Out + t * stride_ot + h * stride_oh
    s_row = ResOut + t * stride_st + h * stride_sh
    cols = tl.arange(0, BLOCK_D)
    act = Out.dtype.element_ty
    if CHUNKS == 1:
        mask = row_ok[:, None] & (cols[None, :] < DIM)
        x = tl.load(x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            summed = (x + r).to(act)
            tl.store(s_row[:, None] + cols[None, :], summed, mask=mask)
            x = summed.to(tl.float32)
        mean_sq = tl.reduce(x * x, 1, tl.standard._sum_combine) / DIM
        rstd = tl.rsqrt(mean_sq + eps)
        w = tl.load(W + cols, mask=cols < DIM, other=0.0).to(tl.float32)
        y = (x * rstd[:, None]).to(act).to(tl.float32) * w[None, :]
        tl.store(o_row[:, None] + cols[None, :], y.to(act), mask=mask)
    else:
        # Rows too long for registers: sum the squares chunk by chunk, then re-read to scale.
        # The second pass reads the sum back from ResOut (the inputs may alias it); the barrier
        # makes every thread's first-pass stores visible to the whole program.
        sq = tl.full([ROWS], 0.0, tl.float32)
        for c in range(CHUNKS):
            cc = c * BLOCK_D + cols
            mask = row_ok[:, None] & (cc[None, :] < DIM)
            x = tl.load(x_row[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_row[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                summed = (x + r).to(act)
                tl.store(s_row[:, None] + cc[None, :], summed, mask=mask)
                x = summed.to(tl.float32)
            sq += tl.reduce(x * x, 1, tl.standard._sum_combine)
        rstd = tl.rsqrt(sq / DIM + eps)
        tl.debug_barrier()
        for c in range(CHUNKS):
            cc = c * BLOCK_D + cols
            mask = row_ok[:, None] & (cc[None, :] < DIM)
            if HAS_RESIDUAL:
                x = tl.load(s_row[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cc, mask=cc < DIM, other=0.0).to(tl.float32)
            y = (x * rstd[:, None]).to(act).to(tl.float32) * w[None, :]
            tl.store(o_row[:, None] + cc[None, :], y.to(act), mask=mask)


def _silu_and_mul_kernel(
    GateUp,
    Out,
    size,
    stride_gt,
    stride_ot,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate_row = GateUp + t * stride_gt
    gate = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_row + size + cols, mask=mask, other=0.0).to(tl.float32)
    act = Out.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(act).to(tl.float32)
    tl.store(Out + t * stride_ot + cols, (silu * up).to(act), mask=mask)


def _rotary_kernel(
    Positions,
    CosSin,
    Q,
    K,
    QOut,
    KOut,
    stride_cs,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    Q_HEADS: tl.constexpr,
    K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per token rotates all its q and k heads: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s),
    # each product rounded to the activation dtype first as the torch path does.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Positions + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    act = QOut.dtype.element_ty
    # HF casts cos/sin to the activation dtype before rotating.
    cos = tl.load(CosSin + pos * stride_cs + d, mask=d_ok, other=0.0).to(act).to(tl.float32)
    sin = tl.load(CosSin + pos * stride_cs + HALF + d, mask=d_ok, other=0.0)
    sin = sin.to(act).to(tl.float32)
    cos, sin = cos[None, :], sin[None, :]

    qh = tl.arange(0, BLOCK_QH)
    q_mask = (qh[:, None] < Q_HEADS) & d_ok[None, :]
    q_in = Q + t * stride_qt + qh[:, None] * stride_qh + d[None, :]
    q1 = tl.load(q_in, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_in + HALF, mask=q_mask, other=0.0).to(tl.float32)
    q_out = QOut + t * stride_qot + qh[:, None] * stride_qoh + d[None, :]
    q1c, q2s = (q1 * cos).to(act).to(tl.float32), (q2 * sin).to(act).to(tl.float32)
    q2c, q1s = (q2 * cos).to(act).to(tl.float32), (q1 * sin).to(act).to(tl.float32)
    tl.store(q_out, (q1c - q2s).to(act), mask=q_mask)
    tl.store(q_out + HALF, (q2c + q1s).to(act), mask=q_mask)

    kh = tl.arange(0, BLOCK_KH)
    k_mask = (kh[:, None] < K_HEADS) & d_ok[None, :]
    k_in = K + t * stride_kt + kh[:, None] * stride_kh + d[None, :]
    k1 = tl.load(k_in, mask=k_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_in + HALF, mask=k_mask, other=0.0).to(tl.float32)
    k_out = KOut + t * stride_kot + kh[:, None] * stride_koh + d[None, :]
    k1c, k2s = (k1 * cos).to(act).to(tl.float32), (k2 * sin).to(act).to(tl.float32)
    k2c, k1s = (k2 * cos).to(act).to(tl.float32), (k1 * sin).to(act).to(tl.float32)
    tl.store(k_out, (k1c - k2s).to(act), mask=k_mask)
    tl.store(k_out + HALF, (k2c + k1s).to(act), mask=k_mask)


RMS_NORM_KERNEL = dual_kernel(_rms_norm_kernel)
SILU_AND_MUL_KERNEL = dual_kernel(_silu_and_mul_kernel)
ROTARY_KERNEL = dual_kernel(_rotary_kernel)


# ------------------------------------------------------------------------------------- RMSNorm


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension: ``weight * (x * rsqrt(mean(x^2) + eps))``.

    Args:
        x: [T, D] or [T, H, D] (Qwen3's per-head q/k norm), last dimension contiguous; other
            strides are free, so a view into a merged qkv output needs no copy.
        weight: [D], same dtype as ``x``.
        eps: added to the mean square.
        out: where to write (shaped like ``x``, last dimension contiguous; may be ``x``);
            default a new contiguous tensor.

    Returns:
        The normalised rows (``out``), shaped and typed like ``x``.
    """
    out = _empty_like_rows(x) if out is None else out
    _launch_norm(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (rounded to the activation dtype), then RMSNorm of ``s``, in one pass.

    Args:
        x: [T, D] the sublayer output.
        residual: [T, D] the residual stream, same dtype.
        weight: [D], same dtype.
        eps: added to the mean square.
        out: where the normalised rows go (default: a new tensor).
        residual_out: where ``s`` goes (default: a new tensor; may be ``residual`` itself).

    Returns:
        ``(normed, s)``; ``s`` is the next residual.
    """
    out = _empty_like_rows(x) if out is None else out
    residual_out = _empty_like_rows(x) if residual_out is None else residual_out
    _launch_norm(x, residual, weight, eps, out, residual_out)
    return out, residual_out


def _empty_like_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _launch_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    summed: torch.Tensor | None,
) -> None:
    x = _as_rows(x)
    dim = x.shape[-1]
    if weight.numel() != dim:
        raise ValueError(f"weight has {weight.numel()} elements for rows of {dim}")
    num_rows = x.shape[0] * x.shape[1]
    if num_rows == 0:
        return
    r = _as_rows(residual) if residual is not None else x
    o = _output_rows(out, x.shape)
    s = _output_rows(summed, x.shape) if summed is not None else o
    block_d = min(next_pow2(dim), MAX_NORM_BLOCK)
    rows = max(1, NORM_PROGRAM_ELEMENTS // block_d)
    grid = (-(-num_rows // rows),)
    RMS_NORM_KERNEL.on(x.device)[grid](
        x, r, weight.contiguous(), o, s, num_rows, x.shape[1], float(eps),
        *_row_strides(x), *_row_strides(r), *_row_strides(o), *_row_strides(s),
        DIM=dim, BLOCK_D=block_d, ROWS=rows, CHUNKS=-(-dim // block_d),
        HAS_RESIDUAL=residual is not None, num_warps=_norm_warps(rows * block_d),
    )  # fmt: skip


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """A [T, H, D] view with a contiguous last dimension (2-D inputs get H = 1)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.reshape(-1, 1, x.shape[-1])


def _output_rows(out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``out`` as the same [T, H, D] rows as the input, without a copy (writes must land)."""
    if out.stride(-1) != 1:
        raise ValueError(f"output's last dimension must be contiguous, got strides {out.stride()}")
    rows = out.unsqueeze(1) if out.dim() == 2 else out if out.dim() == 3 else out.view(shape)
    if rows.shape != shape:
        raise ValueError(f"output shaped {tuple(out.shape)} does not match the input rows {shape}")
    return rows


def _row_strides(x: torch.Tensor) -> tuple[int, int]:
    # With one head the head stride is never used (h == 0); 0 keeps it out of the index math.
    return x.stride(0), (x.stride(1) if x.shape[1] > 1 else 0)


def _norm_warps(elements: int) -> int:
    # About 16 elements per thread: a 4096-wide row gets 8 warps, a 2048-element tile 4.
    return max(2, min(16, elements // 512))


# ---------------------------------------------------------------------------------- SiLU-and-mul


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU over a merged gate/up projection: ``silu(gate) * up``.

    Args:
        gate_up: [..., 2 * I], gate half first.
        out: contiguous [..., I] to write into (default: a new tensor).

    Returns:
        ``out``: [..., I] in ``gate_up``'s dtype.
    """
    size = gate_up.shape[-1] // 2
    if out is None:
        out = torch.empty((*gate_up.shape[:-1], size), dtype=gate_up.dtype, device=gate_up.device)
    rows_in = gate_up.reshape(-1, 2 * size) if gate_up.dim() != 2 else gate_up
    if rows_in.stride(-1) != 1:
        rows_in = rows_in.contiguous()
    rows_out = out.view(-1, size)  # raises rather than copy: the kernel's writes must land
    if rows_in.shape[0] == 0 or size == 0:
        return out
    block = min(SILU_BLOCK, next_pow2(size))
    grid = (rows_in.shape[0], -(-size // block))
    SILU_AND_MUL_KERNEL.on(gate_up.device)[grid](
        rows_in, rows_out, size, rows_in.stride(0), rows_out.stride(0),
        BLOCK=block, num_warps=max(1, min(8, block // 256)),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------- rotary


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary (HF Llama): each head's two halves rotate by the position's angles.

    Args:
        positions: [T] integer absolute positions (below the cache length: not checked here).
        q: [T, Hq, D], last dimension contiguous (a view into a merged qkv output is fine).
        k: [T, Hk, D], same dtype.
        cos_sin_cache: [max_positions, D] float32, cos of the D/2 frequencies then their sin
            (scaling such as llama3's is already in it).
        inplace: rotate ``q`` and ``k`` themselves instead of writing new tensors.

    Returns:
        The rotated ``(q, k)``: new contiguous tensors, or ``q`` and ``k`` when ``inplace``.
    """
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos_sin_cache = _last_dim_contiguous(cos_sin_cache)
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = k if inplace else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    tokens, q_heads, head_dim = q.shape
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    ROTARY_KERNEL.on(q.device)[(tokens,)](
        positions, cos_sin_cache, q, k, q_out, k_out, cos_sin_cache.stride(0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        Q_HEADS=q_heads, K_HEADS=k.shape[1], HALF=half, BLOCK_QH=next_pow2(q_heads),
        BLOCK_KH=next_pow2(k.shape[1]), BLOCK_HALF=next_pow2(half),
        num_warps=max(1, min(8, next_pow2(q_heads) * next_pow2(half) // 256)),
        # Without this the compiler turns a product and the sum after it into one bf16 FMA,
        # skipping the product's rounding that the torch path (and HF) performs.
        enable_fp_fusion=False,
    )  # fmt: skip
    return q_out, k_out


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
