"""The FP8 KV pool: quantized storage with per-layer scales, the torch reference reading it, and
the engine running with an FP8 cache (and FP8 weights) end to end."""

from __future__ import annotations

import sys

import pytest
import torch

from radixlm.batch import ForwardBatch
from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import EngineCore
from radixlm.kvcache.pool import (
    FP8_KV_DTYPE,
    KVPool,
    read_float,
    resolve_kv_dtype,
)
from radixlm.model.attention.torch_backend import TorchAttentionBackend
from radixlm.model.attention.triton_backend import TritonAttentionBackend
from radixlm.model.loader import load_model
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams


def test_resolve_kv_dtype():
    assert resolve_kv_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_dtype("fp8_e4m3", torch.float32) == FP8_KV_DTYPE
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_dtype("int8", torch.float32)


def test_an_fp8_pool_takes_half_the_bytes_of_bf16():
    bf16 = KVPool.bytes_per_token(32, 8, 128, torch.bfloat16)
    assert bf16 == 2 * 32 * 8 * 128 * 2
    assert KVPool.bytes_per_token(32, 8, 128, FP8_KV_DTYPE) * 2 == bf16


def test_store_quantizes_with_the_layer_scales_and_read_float_restores_them():
    pool = KVPool(2, 2, 8, 4, 4, FP8_KV_DTYPE, "cpu", kv_scales=[(1.0, 1.0), (0.5, 4.0)])
    assert pool.is_fp8 and pool.scales(1) == (0.5, 4.0)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(3, 2, 8, generator=gen)
    v = torch.randn(3, 2, 8, generator=gen) * 1000  # beyond 448 x 4: saturates
    loc = torch.tensor([4, 9, 13])
    pool.store(1, loc, k, v)
    assert pool.k(1).dtype == FP8_KV_DTYPE
    # Stored values are x / scale rounded to e4m3: 3 mantissa bits, relative error <= 2^-4.
    k_back = read_float(pool.k(1)[loc], 0.5)
    assert ((k_back - k).abs() <= k.abs() * 2**-4 + 2**-9 * 0.5).all()
    v_back = read_float(pool.v(1)[loc], 4.0)
    assert v_back.abs().max() == 448 * 4.0 and torch.isfinite(v_back).all()
    assert torch.equal(pool.k(0), torch.zeros_like(pool.k(0)))  # layer 0 untouched


def test_pool_scale_validation():
    with pytest.raises(ValueError, match="need an FP8 pool"):
        KVPool(1, 1, 8, 1, 1, torch.float32, "cpu", kv_scales=[(2.0, 1.0)])
    with pytest.raises(ValueError, match="2 KV scale pairs for 1 layers"):
        KVPool(1, 1, 8, 1, 1, FP8_KV_DTYPE, "cpu", kv_scales=[(1.0, 1.0)] * 2)
    with pytest.raises(ValueError, match="positive"):
        KVPool(1, 1, 8, 1, 1, FP8_KV_DTYPE, "cpu", kv_scales=[(0.0, 1.0)])


@pytest.fixture(scope="module")
def tiny_model(tiny_llama3_dir):
    return load_model(tiny_llama3_dir, "float32", "cpu", progress=False)


def model_logits(model, pool, attn, prompts) -> torch.Tensor:
    slots, start = [], pool.first_usable_slot
    for p in prompts:
        slots.append(list(range(start, start + len(p))))
        start += len(p)
    rows = [list(range(len(p))) for p in prompts]
    return model(ForwardBatch.build(prompts, slots, logits_rows=rows), pool, attn)


def make_pool(model, dtype, scales=None) -> KVPool:
    arch = model.arch
    return KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, 128, 1, dtype, "cpu",
                  kv_scales=scales)  # fmt: skip


PROMPTS = [[128000, 791, 4062, 14198, 39935, 35308], [128000, 40, 1093, 10065]]


def test_torch_attention_over_fp8_equals_attention_over_its_dequantized_values(tiny_model):
    """The FP8 path is exactly 'dequantize, then the float op': rerun the same batch on a
    float32 pool pre-filled with the dequantized FP8 contents (and no further writes)."""
    scales = [(0.05, 0.03)] * tiny_model.arch.num_layers
    fp8_pool = make_pool(tiny_model, FP8_KV_DTYPE, scales)
    fp8 = model_logits(tiny_model, fp8_pool, TorchAttentionBackend(), PROMPTS)

    class Frozen(TorchAttentionBackend):
        """Reads a pool that already holds the dequantized K/V; writes nothing."""

        def store_kv(self, k, v, layer_id, loc, pool):
            pass

    float_pool = make_pool(tiny_model, torch.float32)
    for layer in range(tiny_model.arch.num_layers):
        k_scale, v_scale = fp8_pool.scales(layer)
        float_pool.k(layer).copy_(read_float(fp8_pool.k(layer), k_scale))
        float_pool.v(layer).copy_(read_float(fp8_pool.v(layer), v_scale))
    ref = model_logits(tiny_model, float_pool, Frozen(), PROMPTS)
    torch.testing.assert_close(fp8, ref, rtol=1e-5, atol=1e-5)
    # And the cache did round: the float cache gives other logits.
    exact = model_logits(tiny_model, make_pool(tiny_model, torch.float32), Frozen(), PROMPTS)
    assert not torch.allclose(fp8, exact, rtol=1e-4, atol=1e-4)


def test_triton_backend_over_fp8_matches_the_torch_reference(tiny_model):
    scales = [(0.7, 1.3)] * tiny_model.arch.num_layers
    ref = model_logits(tiny_model, make_pool(tiny_model, FP8_KV_DTYPE, scales),
                       TorchAttentionBackend(), PROMPTS)  # fmt: skip
    out = model_logits(tiny_model, make_pool(tiny_model, FP8_KV_DTYPE, scales),
                       TritonAttentionBackend("cpu"), PROMPTS)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(sys.platform != "linux", reason="CPU torch path tested on Linux")
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_engine_runs_with_an_fp8_cache_and_frees_every_slot(tiny_llama3_dir, quantization):
    config = EngineConfig.from_kwargs(
        model=str(tiny_llama3_dir), device="cpu", dtype="float32", kv_cache_tokens=512,
        kv_cache_dtype="fp8_e4m3", quantization=quantization,
    )  # fmt: skip
    core = EngineCore(config, progress=False)
    assert core.runner.pool.dtype == FP8_KV_DTYPE
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    shared = [128000, 791, 4062, 14198, 39935, 35308, 927, 279]
    for i in range(4):
        core.add_request(ipc.AddRequest(f"r{i}", shared + [100 + i], params, LogprobOptions()))
    tokens: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            tokens.setdefault(out.rid, []).extend(out.new_token_ids)
        core.check_invariants()
    assert sorted(tokens) == ["r0", "r1", "r2", "r3"]
    assert all(len(t) == 6 for t in tokens.values())
    assert core.flush_cache()
    info = core.server_info()
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_triton_over_fp8_matches_torch_over_fp8(tiny_llama3_dir):
    model = load_model(tiny_llama3_dir, "bfloat16", "cuda", progress=False, quantization="fp8")
    arch = model.arch

    def logits(attn):
        pool = KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, 128, 1, FP8_KV_DTYPE,
                      "cuda", kv_scales=[(0.7, 1.3)] * arch.num_layers)  # fmt: skip
        slots, start = [], pool.first_usable_slot
        for p in PROMPTS:
            slots.append(list(range(start, start + len(p))))
            start += len(p)
        rows = [list(range(len(p))) for p in PROMPTS]
        batch = ForwardBatch.build(PROMPTS, slots, logits_rows=rows, device="cuda")
        return model(batch, pool, attn).float()

    ref = logits(TorchAttentionBackend())
    out = logits(TritonAttentionBackend("cuda"))
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def greedy_tokens(model_dir, **options) -> dict[str, list[int]]:
    config = EngineConfig.from_kwargs(model=str(model_dir), device="cuda", kv_cache_tokens=4096,
                                      **options)  # fmt: skip
    core = EngineCore(config, progress=False)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    for i in range(6):
        ids = [128000, 791, 4062, 14198, 39935, 35308, 927, 279, 100 + i] * (1 + i)
        core.add_request(ipc.AddRequest(f"r{i}", ids, params, LogprobOptions()))
    tokens: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            tokens.setdefault(out.rid, []).extend(out.new_token_ids)
    assert core.flush_cache()
    info = core.server_info()
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]
    return tokens


@pytest.mark.gpu
def test_gpu_fp8_engine_replays_cuda_graphs_with_the_same_tokens(tiny_llama3_dir):
    """FP8 weights and cache through the engine: decode from CUDA graphs (FP8 GEMMs, per-token
    quantization and the FP8 KV kernels captured) gives the eager steps' greedy tokens."""
    fp8 = {"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3", "dtype": "float32"}
    graphs = greedy_tokens(tiny_llama3_dir, **fp8)
    eager = greedy_tokens(tiny_llama3_dir, cuda_graph_max_batch_size=0, **fp8)
    assert graphs == eager
