"""The Triton KV-store / extend / decode kernels over an FP8 pool, against a float64
reference attending over the dequantized pool (stored value x the layer's scale).

CPU tensors run under the Triton interpreter at tiny sizes; the ``gpu`` tests run the compiled
kernels at a Llama-3-8B attention shape (8 KV heads, GQA 4, head_dim 128).
"""

from __future__ import annotations

import pytest
import torch

from radixlm.kvcache.pool import FP8_KV_DTYPE, KVPool, quantize_kv
from radixlm.model.attention.triton_kernels import (
    decode_attention,
    extend_attention,
    store_kv,
)

NUM_KV_HEADS = 2
# Scales that are not powers of two, so a missed or doubled scale cannot cancel out.
K_SCALE, V_SCALE = 0.37, 1.9


def fp8_pool(num_slots: int, head_dim: int, device, gen, num_kv_heads: int = NUM_KV_HEADS):
    """Random K/V quantized into FP8 buffers with K_SCALE / V_SCALE."""
    shape = (num_slots, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen) * 0.5
    v = torch.randn(shape, generator=gen) * 2.0
    return quantize_kv(k, K_SCALE).to(device), quantize_kv(v, V_SCALE).to(device)


def dequant(k_buf, v_buf):
    return k_buf.double().cpu() * K_SCALE, v_buf.double().cpu() * V_SCALE


def reference(q, k, v, seqs, extend_lens, scale) -> torch.Tensor:
    """float64 causal attention of each sequence's last ``n`` tokens over its slots."""
    group = q.shape[1] // k.shape[1]
    out, row = torch.empty(q.shape, dtype=torch.float64), 0
    for slots, n in zip(seqs, extend_lens):
        ks = k[slots].repeat_interleave(group, dim=1)
        vs = v[slots].repeat_interleave(group, dim=1)
        for j in range(n):
            pos = len(slots) - n + j
            scores = torch.einsum("hd,shd->hs", q[row].double().cpu(), ks[: pos + 1]) * scale
            out[row] = torch.einsum("hs,shd->hd", scores.softmax(-1), vs[: pos + 1])
            row += 1
    return out


def slot_lists(lens: list[int], num_slots: int, gen) -> list[torch.Tensor]:
    order = torch.randperm(num_slots - 1, generator=gen) + 1  # slot 0: scratch
    out, used = [], 0
    for n in lens:
        out.append(order[used : used + n])
        used += n
    return out


def indptr(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32).to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def run_decode(seq_lens, group, head_dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(seq_lens) + 8
    k_buf, v_buf = fp8_pool(num_slots, head_dim, device, gen, NUM_KV_HEADS)
    seqs = slot_lists(seq_lens, num_slots, gen)
    q = torch.randn(len(seqs), NUM_KV_HEADS * group, head_dim, generator=gen).to(device, dtype)
    scale = head_dim**-0.5
    out = decode_attention(q, k_buf, v_buf, indptr(seq_lens, device), torch.cat(seqs).to(device),
                           scale, k_scale=K_SCALE, v_scale=V_SCALE)  # fmt: skip
    return out, reference(q, *dequant(k_buf, v_buf), seqs, [1] * len(seqs), scale)


def run_extend(seq_lens, extend_lens, group, head_dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(seq_lens) + 8
    k_buf, v_buf = fp8_pool(num_slots, head_dim, device, gen, NUM_KV_HEADS)
    seqs = slot_lists(seq_lens, num_slots, gen)
    q = torch.randn(sum(extend_lens), NUM_KV_HEADS * group, head_dim, generator=gen)
    q = q.to(device, dtype)
    scale = head_dim**-0.5
    out = extend_attention(
        q, k_buf, v_buf, indptr(extend_lens, device), indptr(seq_lens, device),
        torch.cat(seqs).to(device), max(extend_lens), scale, k_scale=K_SCALE, v_scale=V_SCALE,
    )  # fmt: skip
    return out, reference(q, *dequant(k_buf, v_buf), seqs, extend_lens, scale)


# ---------------------------------------------------------------------------------- CPU


def test_store_kv_into_an_fp8_pool_quantizes_like_the_torch_pool():
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(1, NUM_KV_HEADS, 16, 4, 8, FP8_KV_DTYPE, "cpu", kv_scales=[(K_SCALE, V_SCALE)])
    k = torch.randn(9, NUM_KV_HEADS, 16, generator=gen) * 100  # some saturate at 448 x scale
    v = torch.randn(9, NUM_KV_HEADS, 16, generator=gen)
    loc = torch.randperm(24, generator=gen)[:9] + 8
    k_buf, v_buf = pool.k(0).clone(), pool.v(0).clone()
    store_kv(k, v, k_buf, v_buf, loc, k_scale=K_SCALE, v_scale=V_SCALE)
    pool.store(0, loc, k, v)
    assert torch.equal(k_buf.view(torch.uint8), pool.k(0).view(torch.uint8))
    assert torch.equal(v_buf.view(torch.uint8), pool.v(0).view(torch.uint8))
    assert k_buf[loc].float().abs().max() == 448.0  # saturated, not inf/nan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_over_an_fp8_pool(dtype, group):
    out, ref = run_decode([1, 17, 70], group, 16, dtype, "cpu", seed=group)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_over_an_fp8_pool(dtype):
    out, ref = run_extend([12, 40], [12, 7], 2, 16, dtype, "cpu", seed=3)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_store_kv_quantizes_like_torch():
    gen = torch.Generator().manual_seed(10)
    k = (torch.randn(512, 8, 128, generator=gen) * 3).cuda().bfloat16()
    v = torch.randn(512, 8, 128, generator=gen).cuda().bfloat16()
    k_buf = torch.zeros(4096, 8, 128, dtype=FP8_KV_DTYPE, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    loc = (torch.randperm(4000, generator=gen)[:512] + 16).cuda()
    store_kv(k, v, k_buf, v_buf, loc, k_scale=K_SCALE, v_scale=V_SCALE)
    ref_k, ref_v = quantize_kv(k, K_SCALE), quantize_kv(v, V_SCALE)
    for got, ref in ((k_buf[loc], ref_k), (v_buf[loc], ref_v)):
        # The kernel divides with the GPU's fast division: allow one FP8 step on rare ties.
        differ = got.view(torch.uint8) != ref.view(torch.uint8)
        assert differ.float().mean().item() < 1e-3
        step = (got.float() - ref.float()).abs() / ref.float().abs().clamp(min=2**-6)
        assert step.max().item() <= 0.13


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_decode_over_an_fp8_pool(dtype):
    lens = [1, 100, 1000, 4097] * 4
    out, ref = run_decode(lens, 4, 128, dtype, "cuda", seed=11)
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_extend_over_an_fp8_pool(dtype):
    out, ref = run_extend([300, 1024, 77], [300, 512, 1], 4, 128, dtype, "cuda", seed=12)
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)
