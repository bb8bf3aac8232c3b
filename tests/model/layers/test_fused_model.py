"""A whole model on CUDA with the fused layer kernels against the same model on its torch layers."""

from __future__ import annotations

import pytest
import torch

from radixlm.batch import ForwardBatch
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention.torch_backend import TorchAttentionBackend
from radixlm.model.layers.fused import DISABLE_FUSED_ENV
from radixlm.model.random_model import build_random_model, config_dict

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
CONFIGS = {
    "llama3_rope": config_dict("llama", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "qwen3_qk_norm": config_dict("qwen3"),
}


def prefill_then_decode(model, dtype) -> list[torch.Tensor]:
    """Logits of a two-sequence prefill (5 and 9 tokens), then of one decode step."""
    arch = model.arch
    pool = KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, 64, 1, dtype, "cuda")
    attn = TorchAttentionBackend()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, arch.vocab_size, (n,), generator=gen).tolist() for n in (5, 9)]
    slots = [list(range(1, 7)), list(range(10, 20))]  # one spare slot each for the decode token
    batch = ForwardBatch.build(prompts, [s[:-1] for s in slots], device="cuda")
    first = model(batch, pool, attn)
    step = ForwardBatch.build([[7], [8]], slots, device="cuda")
    return [first, model(step, pool, attn)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_model_logits_match_the_torch_layers(monkeypatch, name, dtype):
    model = build_random_model(CONFIGS[name], dtype, "cuda", seed=3)
    monkeypatch.delenv(DISABLE_FUSED_ENV, raising=False)
    fused = prefill_then_decode(model, dtype)
    monkeypatch.setenv(DISABLE_FUSED_ENV, "1")
    reference = prefill_then_decode(model, dtype)
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for ours, ref in zip(fused, reference):
        assert not ours.isnan().any()
        assert ((ours - ref).norm() / ref.norm()).item() < bound
