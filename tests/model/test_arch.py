"""ModelArch parsing of config.json dicts as transformers 4.x and 5.x write them."""

from __future__ import annotations

import json

import pytest

from radixlm.model.arch import ModelArch, RopeScaling, UnsupportedModelError

# Field values of the public Meta-Llama-3.1-8B-Instruct config.json (transformers 4.x layout).
LLAMA31_V4 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def test_llama31_v4_layout():
    arch = ModelArch.from_hf_config(LLAMA31_V4)
    assert arch.architecture == "LlamaForCausalLM"
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (32, 8, 128)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert arch.eos_token_ids == (128001, 128008, 128009)
    assert arch.torch_dtype == "bfloat16"
    assert not (arch.attention_bias or arch.o_proj_bias or arch.mlp_bias or arch.qk_norm)


def test_v5_rope_parameters_layout_is_equivalent():
    v5 = {k: v for k, v in LLAMA31_V4.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA31_V4["rope_scaling"], "rope_theta": 500000.0}
    v5["dtype"] = v5.pop("torch_dtype")
    assert ModelArch.from_hf_config(v5) == ModelArch.from_hf_config(LLAMA31_V4)


def test_old_type_key_and_linear_scaling():
    cfg = {**LLAMA31_V4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelArch.from_hf_config(cfg).rope_scaling == RopeScaling("linear", 2.0)


def test_transformers_config_objects_parse():
    from transformers import Qwen2Config, Qwen3Config

    qwen2 = ModelArch.from_hf_config(Qwen2Config(hidden_size=64, num_attention_heads=4))
    assert qwen2.architecture == "Qwen2ForCausalLM"
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    assert qwen2.head_dim == 16  # no head_dim in Qwen2Config: hidden / heads
    qwen3 = ModelArch.from_hf_config(Qwen3Config(head_dim=32, attention_bias=True))
    assert qwen3.qk_norm and qwen3.head_dim == 32
    assert qwen3.attention_bias and qwen3.o_proj_bias


def test_mistral_window_only_when_it_restricts():
    base = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4}
    base |= {"num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10}
    assert ModelArch.from_hf_config({**base, "sliding_window": 4096}).sliding_window is None
    windowed = {**base, "sliding_window": 4096, "max_position_embeddings": 32768}
    assert ModelArch.from_hf_config(windowed).sliding_window == 4096
    assert ModelArch.from_hf_config({**base, "sliding_window": None}).sliding_window is None


@pytest.mark.parametrize(
    "change, words",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, ["GPT2LMHeadModel"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["yarn", "llama3"]),
        ({"hidden_act": "gelu"}, ["gelu"]),
    ],
)
def test_unsupported_features_name_themselves(change, words):
    with pytest.raises(UnsupportedModelError) as info:
        ModelArch.from_hf_config({**LLAMA31_V4, **change})
    for word in words:
        assert word in str(info.value)


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM") as info:
        ModelArch.from_hf_config({**LLAMA31_V4, "architectures": ["PhiForCausalLM"]})
    assert "PhiForCausalLM" in str(info.value)


def test_qwen_per_layer_sliding_window_rejected():
    cfg = {**LLAMA31_V4, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}
    with pytest.raises(UnsupportedModelError, match="sliding"):
        ModelArch.from_hf_config(cfg)


def test_from_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_V4))
    assert ModelArch.from_dir(tmp_path) == ModelArch.from_hf_config(LLAMA31_V4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelArch.from_dir(tmp_path / "nowhere")
