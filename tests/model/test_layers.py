"""Layers against transformers' Llama implementations and plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from radixlm.model.arch import ModelArch
from radixlm.model.layers.activation import silu_and_mul
from radixlm.model.layers.norm import RMSNorm
from radixlm.model.layers.rotary import RotaryEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_and_fuses_residual(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=gen).to(dtype)
    residual = torch.randn(7, 32, generator=gen).to(dtype)
    weight = torch.randn(32, generator=gen).to(dtype)
    ours, ref = RMSNorm(32, 1e-5).to(dtype), LlamaRMSNorm(32, 1e-5).to(dtype)
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        normed, new_residual = ours(x, residual)
        assert torch.equal(new_residual, residual + x)
        assert torch.equal(normed, ref(residual + x))


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_hf_at_absolute_positions(case, dtype):
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        head_dim=32,
        max_position_embeddings=256,
        rope_theta=50000.0,
        rope_scaling=ROPE_CASES[case],
    )
    arch = ModelArch.from_hf_config(config)
    ours = RotaryEmbedding(32, 256, arch.rope_theta, arch.rope_scaling)
    gen = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 1, 2, 200, 7, 7, 255, 31])
    q = torch.randn(8, 4, 32, generator=gen).to(dtype)
    k = torch.randn(8, 2, 32, generator=gen).to(dtype)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    # HF layout is [batch, heads, seq, dim]; ours is [tokens, heads, dim].
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_out, k_out = ours(positions, q, k)
    assert torch.equal(q_out, q_ref[0].transpose(0, 1))
    assert torch.equal(k_out, k_ref[0].transpose(0, 1))


def test_rotary_cache_survives_meta_build_and_rebuild():
    with torch.device("meta"):
        rotary = RotaryEmbedding(16, 64, 10000.0)
    rotary = rotary.to(torch.bfloat16).to_empty(device="cpu")
    rotary.rebuild_cache()
    fresh = RotaryEmbedding(16, 64, 10000.0)
    assert rotary.cos_sin_cache.dtype == torch.float32
    assert torch.equal(rotary.cos_sin_cache, fresh.cos_sin_cache)


def test_silu_and_mul():
    x = torch.randn(5, 2 * 24)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :24]) * x[:, 24:])
