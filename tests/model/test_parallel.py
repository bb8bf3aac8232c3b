"""Tensor-parallel sharding: each rank's weights are the right slices of the checkpoint.

The expected slices are computed here from the safetensors file read whole (heads by
``view``/``chunk``), independently of the loader's slice arithmetic. The forward pass under
tensor parallelism is compared with the single-device model in tests/executor/test_tp.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from radixlm.model.arch import ModelArch
from radixlm.model.loader import load_model
from radixlm.model.parallel import RowParallelLinear, ShardLayout, TensorParallel, check_shardable
from radixlm.model.random_model import make_random_model_dir

CASES = {
    # 2 KV heads (split at 2 ranks, replicated at 4), a vocabulary that does not divide evenly
    "llama_kv2": ("llama", {"num_key_value_heads": 2, "vocab_size": 509}),
    # q/k/v biases, one KV head
    "qwen2_kv1": ("qwen2", {"num_key_value_heads": 1, "vocab_size": 500}),
    # q/k norms, tied embedding
    "qwen3_tied": ("qwen3", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    # o_proj and MLP biases (row-parallel layers keep their whole bias)
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {
        name: make_random_model_dir(root / name, arch, seed=3, **over)
        for name, (arch, over) in CASES.items()
    }


def expected_shard(full: dict[str, torch.Tensor], arch: ModelArch, rank: int, size: int):
    """Our parameter name -> this rank's expected tensor, from the whole checkpoint."""
    heads, kv, dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
    out: dict[str, torch.Tensor] = {}
    rows = -(-arch.vocab_size // size)

    def vocab_rows(t: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(rows * size, t.shape[1], dtype=t.dtype)
        padded[: t.shape[0]] = t
        return padded.chunk(size)[rank]

    def kv_heads(t: torch.Tensor) -> torch.Tensor:
        per_head = t.reshape(kv, dim, *t.shape[1:])
        if kv >= size:
            return per_head.chunk(size)[rank].reshape(-1, *t.shape[1:])
        return per_head[rank * kv // size].reshape(-1, *t.shape[1:])

    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        for kind in ("weight", "bias"):
            q_name = f"{p}self_attn.q_proj.{kind}"
            if q_name in full:
                q = full[q_name].reshape(heads, dim, *full[q_name].shape[1:])
                q = q.chunk(size)[rank].reshape(-1, *full[q_name].shape[1:])
                k = kv_heads(full[f"{p}self_attn.k_proj.{kind}"])
                v = kv_heads(full[f"{p}self_attn.v_proj.{kind}"])
                out[f"{p}self_attn.qkv_proj.{kind}"] = torch.cat([q, k, v])
            gate = full.get(f"{p}mlp.gate_proj.{kind}")
            if gate is not None:
                up = full[f"{p}mlp.up_proj.{kind}"]
                out[f"{p}mlp.gate_up_proj.{kind}"] = torch.cat(
                    [gate.chunk(size)[rank], up.chunk(size)[rank]]
                )
        out[f"{p}self_attn.o_proj.weight"] = full[f"{p}self_attn.o_proj.weight"].chunk(size, 1)[
            rank
        ]
        out[f"{p}mlp.down_proj.weight"] = full[f"{p}mlp.down_proj.weight"].chunk(size, 1)[rank]
        for whole in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            if p + whole in full:
                out[p + whole] = full[p + whole]
    out["model.embed_tokens.weight"] = vocab_rows(full["model.embed_tokens.weight"])
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = vocab_rows(full["lm_head.weight"])
    for name, tensor in full.items():  # norms: every rank holds them whole
        if "norm" in name:
            out[name] = tensor
    return out


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_loads_its_slice_of_the_checkpoint(dirs, name, size):
    path = dirs[name]
    arch = ModelArch.from_dir(path)
    full = load_file(str(path / "model.safetensors"))
    for rank in range(size):
        model = load_model(
            path, torch.float32, "cpu", progress=False, tp=TensorParallel(rank, size)
        )
        params = dict(model.named_parameters())
        want = expected_shard(full, arch, rank, size)
        assert set(params) == set(want), (rank, set(params) ^ set(want))
        for key, tensor in want.items():
            assert torch.equal(params[key], tensor), (rank, key)
        if arch.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight


def test_single_device_model_has_plain_layers(dirs):
    """TP=1 pays nothing: nn.Linear / nn.Embedding, no collective anywhere."""
    model = load_model(dirs["llama_bias"], torch.float32, "cpu", progress=False)
    kinds = {type(m) for m in model.modules()}
    assert RowParallelLinear not in kinds
    assert type(model.model.embed_tokens) is nn.Embedding
    assert type(model.lm_head) is nn.Linear
    assert model.tp is None and model.layout.size == 1


def test_layout_of_replicated_kv_heads():
    arch = ModelArch.from_hf_config(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "vocab_size": 100,
        }
    )
    layouts = [ShardLayout.of(arch, r, 8) for r in range(8)]
    # query head h attends KV head h // 4; each rank keeps the one its head needs
    assert [lay.kv_head_start for lay in layouts] == [h // 4 for h in range(8)]
    assert all(lay.num_heads == 1 and lay.num_kv_heads == 1 for lay in layouts)
    assert [lay.vocab_real_rows for lay in layouts] == [13] * 7 + [9]


@pytest.mark.parametrize(
    ("override", "size", "message"),
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 6}, 4, "num_attention_heads=6"),
        ({"num_key_value_heads": 6, "num_attention_heads": 12}, 4, "num_key_value_heads=6"),
        ({"num_key_value_heads": 3, "num_attention_heads": 24}, 8, "not a multiple of"),
        ({"intermediate_size": 90}, 4, "intermediate_size=90"),
    ],
)
def test_unshardable_shapes_are_refused(override, size, message):
    config = {
        "model_type": "llama",
        "hidden_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 128,
        "vocab_size": 100,
        **override,
    }
    with pytest.raises(ValueError, match=message):
        check_shardable(ModelArch.from_hf_config(config), size)


def test_dummy_load_format_reads_no_weights(dirs, tmp_path):
    """load_format=dummy: config.json alone suffices (benchmarks of shapes too big for disk)."""
    (tmp_path / "config.json").write_text((dirs["llama_kv2"] / "config.json").read_text())
    model = load_model(
        tmp_path,
        torch.float32,
        "cpu",
        progress=False,
        tp=TensorParallel(1, 2),
        load_format="dummy",
    )
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all() and param.std() > 0, name
