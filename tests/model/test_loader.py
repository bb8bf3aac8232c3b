"""Loading HF model directories: shards, tied embeddings, dtypes and the error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixlm.model.arch import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from radixlm.model.loader import (
    MissingWeightsError,
    UnexpectedWeightsError,
    load_model,
    resolve_dtype,
)
from radixlm.model.random_model import make_random_model_dir


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def copy_with_state(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    """A copy of ``src`` whose weights are ``state`` in one model.safetensors."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_sharded_checkpoint_loads_same_weights(model_dir, loaded, tmp_path):
    sharded = make_random_model_dir(tmp_path / "sharded", arch="qwen2", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    one = loaded(model_dir("qwen2"))
    many = load_model(sharded, torch.float32, "cpu", progress=False)
    for (name, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items()):
        assert torch.equal(a, b), name


def test_merged_projections_hold_hf_blocks_in_order(model_dir, loaded):
    path = model_dir("qwen2")
    state, model = hf_state(path), loaded(path)
    attn = model.model.layers[1].self_attn
    hf = "model.layers.1.self_attn"
    for kind in ("weight", "bias"):
        want = torch.cat([state[f"{hf}.{p}_proj.{kind}"] for p in "qkv"])
        assert torch.equal(getattr(attn.qkv_proj, kind), want)
    mlp = "model.layers.1.mlp"
    want = torch.cat([state[f"{mlp}.gate_proj.weight"], state[f"{mlp}.up_proj.weight"]])
    assert torch.equal(model.model.layers[1].mlp.gate_up_proj.weight, want)


def test_tied_embeddings_share_one_tensor(model_dir, loaded):
    path = model_dir("llama_tied")
    assert "lm_head.weight" not in hf_state(path)
    model = loaded(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_checkpoint_that_also_saves_lm_head_loads(model_dir, tmp_path):
    src = model_dir("llama_tied")
    state = hf_state(src)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    model = load_model(copy_with_state(src, tmp_path / "m", state), "float32", "cpu", False)
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_unsupported_architecture_names_it_and_the_supported_ones(model_dir, tmp_path):
    src = model_dir("llama")
    dst = tmp_path / "gpt2"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as info:
        load_model(dst, "float32", "cpu", progress=False)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize(
    "dropped", ["model.layers.1.self_attn.k_proj.weight", "lm_head.weight", "model.norm.weight"]
)
def test_missing_weight_is_named(model_dir, tmp_path, dropped):
    src = model_dir("llama")
    state = hf_state(src)
    del state[dropped]
    with pytest.raises(MissingWeightsError, match=dropped.replace(".", r"\.")):
        load_model(copy_with_state(src, tmp_path / "m", state), "float32", "cpu", False)


def test_unexpected_weight_is_named_but_rotary_cache_is_ignored(model_dir, tmp_path):
    src = model_dir("llama")
    state = hf_state(src)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    model = load_model(copy_with_state(src, tmp_path / "ok", state), "float32", "cpu", False)
    assert model.arch.num_layers == 2
    state["model.layers.0.mlp.gate_proj.weight_scale"] = torch.ones(1)
    with pytest.raises(UnexpectedWeightsError, match="weight_scale"):
        load_model(copy_with_state(src, tmp_path / "bad", state), "float32", "cpu", False)


def test_wrong_shape_is_named(model_dir, tmp_path):
    src = model_dir("llama")
    state = hf_state(src)
    state["model.norm.weight"] = torch.ones(65)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_model(copy_with_state(src, tmp_path / "m", state), "float32", "cpu", False)


def test_no_safetensors_is_reported(model_dir, tmp_path):
    (tmp_path / "config.json").write_text((model_dir("llama") / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path, "float32", "cpu", progress=False)


def test_loads_into_requested_dtype(model_dir):
    path = model_dir("qwen3")
    state = hf_state(path)
    for dtype in (torch.bfloat16, torch.float16):
        model = load_model(path, dtype, "cpu", progress=False)
        weight = model.model.layers[0].self_attn.o_proj.weight
        assert weight.dtype == dtype
        assert torch.equal(weight, state["model.layers.0.self_attn.o_proj.weight"].to(dtype))
        assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32


def test_bf16_checkpoint_auto_dtype_on_cpu_is_float32(tmp_path):
    path = make_random_model_dir(tmp_path / "bf16", arch="llama", dtype="bfloat16")
    model = load_model(path, "auto", "cpu", progress=False)
    assert model.arch.torch_dtype == "bfloat16"
    assert model.lm_head.weight.dtype == torch.float32
    stored = hf_state(path)["lm_head.weight"]
    assert stored.dtype == torch.bfloat16 and torch.equal(model.lm_head.weight, stored.float())


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu", "bfloat16") == torch.float32
    assert resolve_dtype("auto", "cuda", "float32") == torch.bfloat16
    assert resolve_dtype("auto", "cuda:1", "float16") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8", "cpu")
