"""Fused layer kernels (radixlm/model/layers/triton_ops.py) against the torch layers.

The reference is each layer's torch path (norm.py, activation.py, rotary.py: itself checked
against transformers in tests/model/test_layers.py). CPU tensors run the kernels under the Triton
interpreter at tiny sizes; the interpreter rounds float32 to bfloat16 by truncation where the GPU
rounds to nearest, so bf16 checks allow a few units in the last place. Tests marked ``gpu`` run
the compiled kernels at Llama-3-8B shapes and inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from radixlm.model.arch import RopeScaling
from radixlm.model.layers import triton_ops
from radixlm.model.layers.activation import silu_and_mul as torch_silu_and_mul
from radixlm.model.layers.fused import DISABLE_FUSED_ENV, fused_ops_for
from radixlm.model.layers.norm import RMSNorm
from radixlm.model.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]
LLAMA3_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)


def assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: within 1e-5; bf16/fp16: each element within 4 units in the last place, and one
    unit on average (two under the interpreter)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert not ours.isnan().any()
    if ref.dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    else:
        ulp = torch.finfo(ref.dtype).eps
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(ours.float(), ref.float(), rtol=4 * ulp, atol=4 * ulp * scale)
        rel = (ours.float() - ref.float()).norm() / ref.float().norm()
        # The interpreter truncates each intermediate rounding; the GPU rounds to nearest.
        assert rel.item() < (ulp if ours.is_cuda else 2 * ulp)


def make_norm(dim: int, dtype: torch.dtype, gen: torch.Generator, device="cpu") -> RMSNorm:
    norm = RMSNorm(dim, eps=1e-5)
    norm.weight.data = (1 + 0.3 * torch.randn(dim, generator=gen)).to(device, dtype)
    return norm


def rand(*shape: int, gen: torch.Generator, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def qkv_views(tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype, gen, device="cpu"):
    """q, k as strided views into one merged [T, (Hq + 2 Hk) D] projection, as the decoder has."""
    qkv = rand(tokens, (q_heads + 2 * kv_heads) * head_dim, gen=gen, dtype=dtype, device=device)
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim)


# ----------------------------------------------------------------------- CPU, interpreted kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 48])
def test_rms_norm_matches_torch(dtype, dim):
    gen = torch.Generator().manual_seed(0)
    norm, x = make_norm(dim, dtype, gen), rand(5, dim, gen=gen, dtype=dtype, scale=3.0)
    out = torch.full_like(x, float("nan"))
    assert triton_ops.rms_norm(x, norm.weight, norm.eps, out=out) is out
    assert_matches(out, norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_torch(dtype):
    gen = torch.Generator().manual_seed(1)
    norm = make_norm(80, dtype, gen)
    x, residual = rand(3, 80, gen=gen, dtype=dtype), rand(3, 80, gen=gen, dtype=dtype, scale=4.0)
    out, summed = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    triton_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps, out=out, residual_out=summed)
    ref_out, ref_summed = norm(x, residual)
    assert_matches(summed, ref_summed)
    assert_matches(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_norm_on_strided_qkv_views(dtype):
    """Qwen3's q/k norm: rows of [T, H, D] views whose token stride spans the whole qkv row."""
    gen = torch.Generator().manual_seed(2)
    norm = make_norm(16, dtype, gen)
    q, k = qkv_views(5, 6, 2, 16, dtype, gen)
    for x in (q, k):
        ours = triton_ops.rms_norm(x, norm.weight, norm.eps)
        assert ours.shape == x.shape
        assert_matches(ours, norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_walk_in_chunks(monkeypatch, dtype):
    """Rows wider than MAX_NORM_BLOCK take the two-pass loop; in place on the residual too."""
    monkeypatch.setattr(triton_ops, "MAX_NORM_BLOCK", 16)
    gen = torch.Generator().manual_seed(3)
    norm = make_norm(40, dtype, gen)  # 3 chunks, the last one partial
    x, residual = rand(4, 40, gen=gen, dtype=dtype), rand(4, 40, gen=gen, dtype=dtype)
    ref_out, ref_summed = norm(x, residual)
    assert_matches(triton_ops.rms_norm(x, norm.weight, norm.eps), norm(x))
    out, summed = triton_ops.fused_add_rms_norm(
        x, residual, norm.weight, norm.eps, residual_out=residual
    )
    assert summed is residual
    assert_matches(summed, ref_summed)
    assert_matches(out, ref_out)


def test_norm_rejects_outputs_it_could_not_write():
    x, weight = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="contiguous"):
        triton_ops.rms_norm(x, weight, 1e-6, out=torch.empty(8, 4).t())
    with pytest.raises(ValueError, match="weight"):
        triton_ops.rms_norm(x, torch.ones(6), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(monkeypatch, dtype):
    monkeypatch.setattr(triton_ops, "SILU_BLOCK", 16)  # several column blocks per row
    gen = torch.Generator().manual_seed(4)
    gate_up = rand(6, 2 * 40, gen=gen, dtype=dtype, scale=3.0)
    out = torch.full((6, 40), float("nan"), dtype=dtype)
    assert triton_ops.silu_and_mul(gate_up, out=out) is out
    assert_matches(out, torch_silu_and_mul(gate_up))
    batched = gate_up.view(2, 3, 80)
    assert_matches(triton_ops.silu_and_mul(batched), torch_silu_and_mul(batched))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["plain", "llama3"])
def test_rotary_matches_torch(dtype, scaling):
    gen = torch.Generator().manual_seed(5)
    rotary = RotaryEmbedding(16, 256, 10000.0, scaling)
    q, k = qkv_views(7, 6, 2, 16, dtype, gen)
    positions = torch.tensor([0, 1, 255, 3, 3, 128, 77])
    ref_q, ref_k = rotary(positions, q, k)
    ours_q, ours_k = triton_ops.rotary_embedding(positions, q, k, rotary.cos_sin_cache)
    assert_matches(ours_q, ref_q)
    assert_matches(ours_k, ref_k)


def test_rotary_in_place_rotates_the_views_themselves():
    gen = torch.Generator().manual_seed(6)
    rotary = RotaryEmbedding(8, 64, 500000.0)
    q, k = qkv_views(4, 3, 1, 8, torch.float32, gen)
    positions = torch.tensor([5, 0, 63, 9])
    ref_q, ref_k = rotary(positions, q.clone(), k.clone())
    out_q, out_k = triton_ops.rotary_embedding(positions, q, k, rotary.cos_sin_cache, inplace=True)
    assert out_q is q and out_k is k
    assert_matches(q, ref_q)
    assert_matches(k, ref_k)


def test_empty_batches_launch_nothing():
    weight = torch.ones(8)
    assert triton_ops.rms_norm(torch.empty(0, 8), weight, 1e-6).shape == (0, 8)
    assert triton_ops.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    q, k = torch.empty(0, 2, 8), torch.empty(0, 1, 8)
    cache = RotaryEmbedding(8, 16, 10000.0).cos_sin_cache
    assert triton_ops.rotary_embedding(torch.empty(0, dtype=torch.int64), q, k, cache)[0].shape == (
        0, 2, 8)  # fmt: skip


def test_cpu_tensors_stay_on_the_torch_path(monkeypatch):
    """The layers take the kernels on CUDA only; CPU keeps the reference path (and its speed)."""
    monkeypatch.delenv(DISABLE_FUSED_ENV, raising=False)
    assert fused_ops_for(torch.ones(2, 4), torch.ones(4)) is None


# ------------------------------------------------------------------------- GPU, compiled kernels

GPU_TOKENS = [1, 7, 512]


def torch_path(monkeypatch, fn, *args):
    """Run a layer on its torch path (the fused kernels switched off) and switch them back on."""
    monkeypatch.setenv(DISABLE_FUSED_ENV, "1")
    try:
        return fn(*args)
    finally:
        monkeypatch.delenv(DISABLE_FUSED_ENV)


@pytest.mark.gpu
def test_gpu_layers_dispatch_to_the_kernels_unless_disabled(monkeypatch):
    monkeypatch.delenv(DISABLE_FUSED_ENV, raising=False)
    x = torch.ones(2, 4, device="cuda", dtype=torch.bfloat16)
    assert fused_ops_for(x) is triton_ops
    assert fused_ops_for(x, x.float()) is None  # mixed dtypes keep torch's promotion rules
    monkeypatch.setenv(DISABLE_FUSED_ENV, "1")
    assert fused_ops_for(x) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_gpu_norms_at_llama3_8b_shape(monkeypatch, dtype, tokens):
    gen = torch.Generator().manual_seed(10)
    norm = make_norm(4096, dtype, gen, "cuda")
    x = rand(tokens, 4096, gen=gen, dtype=dtype, device="cuda")
    residual = rand(tokens, 4096, gen=gen, dtype=dtype, device="cuda", scale=8.0)
    ref_out, ref_summed = torch_path(monkeypatch, norm, x, residual)
    out, summed = norm(x, residual)
    assert_matches(summed, ref_summed)
    assert_matches(out, ref_out)
    assert_matches(norm(x), torch_path(monkeypatch, norm, x))
    head_norm = make_norm(128, dtype, gen, "cuda")
    q, _ = qkv_views(tokens, 32, 8, 128, dtype, gen, "cuda")
    assert_matches(head_norm(q), torch_path(monkeypatch, head_norm, q))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_gpu_silu_and_rotary_at_llama3_8b_shape(monkeypatch, dtype, tokens):
    gen = torch.Generator().manual_seed(11)
    gate_up = rand(tokens, 2 * 14336, gen=gen, dtype=dtype, device="cuda", scale=2.0)
    ours = torch_silu_and_mul(gate_up)
    assert_matches(ours, torch_path(monkeypatch, torch_silu_and_mul, gate_up))
    rotary = RotaryEmbedding(128, 8192, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    rotary = rotary.to("cuda")
    q, k = qkv_views(tokens, 32, 8, 128, dtype, gen, "cuda")
    positions = torch.randint(0, 8192, (tokens,), generator=gen).cuda()
    ref_q, ref_k = torch_path(monkeypatch, rotary, positions, q, k)
    ours_q, ours_k = rotary(positions, q, k)
    assert_matches(ours_q, ref_q)
    assert_matches(ours_k, ref_k)


@pytest.mark.gpu
def test_gpu_kernels_replay_in_a_cuda_graph_on_new_inputs(monkeypatch):
    """No host sync and no shape-dependent state: a captured layer chain is right on new data."""
    monkeypatch.delenv(DISABLE_FUSED_ENV, raising=False)
    gen = torch.Generator().manual_seed(12)
    dtype, tokens = torch.bfloat16, 4
    norm = make_norm(512, dtype, gen, "cuda")
    rotary = RotaryEmbedding(64, 1024, 10000.0).to("cuda")
    x = rand(tokens, 512, gen=gen, dtype=dtype, device="cuda")
    residual = rand(tokens, 512, gen=gen, dtype=dtype, device="cuda")
    positions = torch.zeros(tokens, dtype=torch.int64, device="cuda")

    def chain():
        normed, summed = norm(x, residual)
        q, k = rotary(positions, normed.view(tokens, 8, 64), summed.view(tokens, 8, 64))
        return torch_silu_and_mul(torch.cat([q, k], dim=-1).view(tokens, -1)), summed

    chain()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    x.copy_(rand(tokens, 512, gen=gen, dtype=dtype, device="cuda"))
    positions.copy_(torch.tensor([3, 1000, 7, 512]))
    graph.replay()
    expected = torch_path(monkeypatch, chain)
    for ours, ref in zip(captured, expected):
        assert_matches(ours, ref)
