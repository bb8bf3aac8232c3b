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


def test_llama3_presets_use_the_real_llama3_tokenizer(llama3_tokenizer_dir, monkeypatch):
    from radixlm.model import random_model

    monkeypatch.setenv(random_model.LLAMA3_TOKENIZER_ENV, str(llama3_tokenizer_dir))
    for preset in ("llama3-8b", "llama3-1b"):
        assert random_model.preset_tokenizer_dir(preset) == llama3_tokenizer_dir
    # Other vocabularies keep the synthetic tokenizer, silently.
    assert random_model.preset_tokenizer_dir("qwen2-0.5b") is None
    assert random_model.preset_tokenizer_dir("llama") is None
    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    assert len(tokenizer) == PRESETS["llama3-8b"]["vocab_size"]
    # The text a JSON constraint needs is in the vocabulary (the synthetic one has no "{").
    assert tokenizer.decode(tokenizer.encode('{"a": 1}', add_special_tokens=False)) == '{"a": 1}'


def test_llama3_tokenizer_found_beside_the_repository_without_the_variable(monkeypatch):
    from radixlm.model import random_model

    monkeypatch.delenv(random_model.LLAMA3_TOKENIZER_ENV, raising=False)
    found = random_model.llama3_tokenizer_dir()
    candidates = random_model._LLAMA3_TOKENIZER_CANDIDATES
    if not any((c / "tokenizer.json").is_file() for c in candidates):
        pytest.skip("no shared/tokenizers/llama3 beside or inside this checkout")
    assert found in candidates


def test_missing_llama3_tokenizer_falls_back_with_a_warning(tmp_path, monkeypatch):
    from radixlm.model import random_model

    monkeypatch.delenv(random_model.LLAMA3_TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(random_model, "_LLAMA3_TOKENIZER_CANDIDATES", (tmp_path / "none",))
    with pytest.warns(UserWarning, match="synthetic"):
        assert random_model.preset_tokenizer_dir("llama3-8b") is None
    monkeypatch.setenv(random_model.LLAMA3_TOKENIZER_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        random_model.llama3_tokenizer_dir()


def test_bench_random_model_dir_copies_the_real_tokenizer(tmp_path, llama3_tokenizer_dir,
                                                         monkeypatch):
    """The cached directory is keyed by its tokenizer and gets the tokenizer's files (weights
    writing is stubbed: an 8B preset is far too big for a unit test)."""
    from radixlm.bench import common
    from radixlm.model import random_model

    monkeypatch.setenv(random_model.LLAMA3_TOKENIZER_ENV, str(llama3_tokenizer_dir))
    monkeypatch.setattr(common, "_write_random_weights", lambda *args: None)
    path = common.random_model_dir("llama3-8b", cache_dir=tmp_path)
    assert path.name.endswith("-tok-llama3")
    assert (path / "tokenizer.json").read_bytes() == (
        llama3_tokenizer_dir / "tokenizer.json").read_bytes()
    from radixlm.tokenizer.tokenizer import load_tokenizer

    assert len(load_tokenizer(str(path))) == PRESETS["llama3-8b"]["vocab_size"]
