"""Random-weight model builders: preset shapes, on-device builds, tokenizer-consistent dirs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from radixlm.model.arch import ModelArch
from radixlm.model.models.decoder import CausalLM
from radixlm.model.random_model import (
    PRESETS,
    build_random_model,
    config_dict,
    make_random_model_dir,
    random_config,
)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_shapes_match_transformers_parameter_count(preset):
    with torch.device("meta"):
        ours = CausalLM(ModelArch.from_hf_config(config_dict(preset)))
        theirs = AutoModelForCausalLM.from_config(random_config(preset))
    assert count_params(ours) == count_params(theirs)


def test_llama3_8b_preset_is_the_public_8b_shape():
    with torch.device("meta"):
        model = CausalLM(ModelArch.from_hf_config(config_dict("llama3-8b")))
    assert count_params(model) == 8_030_261_248  # Meta-Llama-3-8B's published count


def test_build_random_model_is_seeded_nonzero_and_runs(runner_cls, make_prompts):
    model = build_random_model("qwen3", dtype="float32", device="cpu", seed=3)
    again = build_random_model(model.arch, dtype=torch.float32, device="cpu", seed=3)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b) and a.abs().min() > 0 or name.endswith("norm.weight"), name
    tokens = runner_cls(model).greedy(make_prompts(model.arch.vocab_size, [4, 7]), 5)
    assert all(1 <= len(t) <= 5 for t in tokens)


def test_build_random_model_bf16_tied_preset_shape_on_meta_free_path():
    model = build_random_model(
        {**config_dict("llama3-1b"), "num_hidden_layers": 1, "vocab_size": 1000},
        dtype="bfloat16",
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.arch.rope_scaling is not None and model.arch.rope_scaling.rope_type == "llama3"


def test_model_dir_takes_vocab_and_special_ids_from_tokenizer(tmp_path, llama2_tokenizer_dir):
    path = make_random_model_dir(tmp_path / "m", arch="mistral", tokenizer_dir=llama2_tokenizer_dir)
    config = json.loads((path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config["vocab_size"] == len(tokenizer) == 32000
    assert config["bos_token_id"] == tokenizer.bos_token_id == 1
    assert config["eos_token_id"] == tokenizer.eos_token_id == 2
    assert (path / "tokenizer.json").is_file() and not (path / "README.md").exists()
