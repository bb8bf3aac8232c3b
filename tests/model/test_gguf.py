"""GGUF loading against transformers, on tiny random Llama and Qwen2 models written with the
``gguf`` package's own writer and quantizers.

Each model is written out in several quantisation types the way llama.cpp's converter lays it
out (GGUF tensor names, Llama Q/K rows permuted, 1-D tensors in F32, a byte-level BPE vocabulary
with a chat template). The reference is transformers' model holding ``dequantize(quantize(W))``
of every weight, computed here from the HF weights (row-wise quantisation commutes with the row
permutation), so it depends neither on radixlm's loader nor on transformers' GGUF reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radixlm.model.arch import UnsupportedModelError
from radixlm.model.gguf import GGUFError, find_gguf_file, prepare_gguf
from radixlm.model.loader import load_model, model_metadata_dir
from radixlm.tokenizer.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

SHAPE = {
    "hidden_size": 256,  # K-quants pack 256 values per block along a row
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 512,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# (architecture, quantisation of the 2-D weights); the K-quant blocks are random bytes with sane
# scales (the gguf package quantises to K-types only in C), dequantised by the gguf package.
CASES = [
    ("llama", Q.F32),
    ("llama", Q.F16),
    ("llama", Q.BF16),
    ("llama", Q.Q8_0),
    ("llama", Q.Q4_0),
    ("llama", Q.Q4_1),
    ("llama", Q.Q4_K),
    ("llama", Q.Q6_K),
    ("qwen2", Q.F32),
    ("qwen2", Q.Q8_0),
]


@pytest.fixture(scope="module")
def vocab():
    """A small real byte-level BPE (the demo model's) as GGUF vocabulary metadata."""
    from radixlm.model.demo import build_demo_tokenizer

    tok = build_demo_tokenizer()
    backend = tok.backend_tokenizer
    import json

    model = json.loads(backend.to_str())["model"]
    tokens = [None] * len(tok)
    for text, index in tok.get_vocab().items():
        tokens[index] = text
    special = set(tok.all_special_ids)
    types = [3 if i in special else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
        "hf": tok,
    }


@pytest.fixture(scope="module")
def hf_models(vocab):
    """Random-weight transformers models, one per architecture (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        SHAPE,
        vocab_size=len(vocab["tokens"]),
        bos_token_id=vocab["bos"],
        eos_token_id=vocab["eos"],
        tie_word_embeddings=False,
    )
    out = {}
    for seed, (arch, cfg_cls, model_cls) in enumerate(
        [("llama", LlamaConfig, LlamaForCausalLM), ("qwen2", Qwen2Config, Qwen2ForCausalLM)]
    ):
        torch.manual_seed(seed)
        model = model_cls(cfg_cls(**common)).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                # Visible norms and biases, so a mis-mapped one changes the logits.
                if param.dim() == 1:
                    param.copy_(
                        1.0 + 0.1 * torch.randn_like(param)
                        if "norm" in name
                        else 0.05 * torch.randn_like(param)
                    )
        out[arch] = model
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order (rotary halves interleaved per head)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _random_kquant(shape: tuple[int, int], qtype, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a K-quant type whose f16 scales are small and finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.full((rows, cols // block, 1), 0.0005, dtype=np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16) lead the block
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K: d (f16) ends the block
        raw[..., size - 2 : size] = scale
    return raw.reshape(rows, cols // block * size)


def _encode(w: np.ndarray, qtype, rng) -> tuple[np.ndarray, np.ndarray]:
    """(what the file stores, what it dequantises to)."""
    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        stored = w.astype(np.float16)
        return stored, stored.astype(np.float32)
    if qtype in (Q.Q4_K, Q.Q6_K):
        stored = _random_kquant(w.shape, qtype, rng)
    else:
        stored = gguf.quants.quantize(w.astype(np.float32), qtype)
    return stored, gguf.quants.dequantize(stored, qtype).astype(np.float32)


def write_gguf(path: Path, arch: str, hf_model, vocab, qtype, seed: int = 0) -> dict:
    """Write ``hf_model`` as a GGUF; returns the dequantised HF state dict it stands for."""
    cfg = hf_model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(SHAPE["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    reference = {}
    for hf_name, tensor in hf_model.state_dict().items():
        stem, _, suffix = hf_name.rpartition(".")
        w = tensor.float().numpy()
        stored, dequantised = _encode(w, qtype, rng)
        reference[hf_name] = torch.from_numpy(dequantised.reshape(w.shape).copy())
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
            stored = _permute(stored, heads)
        raw_dtype = (
            None
            if stored.dtype in (np.float32, np.float16)
            else (qtype if w.ndim == 2 and qtype != Q.F32 else None)
        )
        writer.add_tensor(f"{names.get_name(stem)}.{suffix}", stored, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("radixlm-cache")
    monkeypatch_module.setenv("RADIXLM_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("arch,qtype", CASES, ids=[f"{a}-{q.name}" for a, q in CASES])
def test_gguf_logits_match_transformers(
    arch, qtype, hf_models, vocab, gguf_dir, cache_dir, runner_cls, make_prompts
):
    hf = hf_models[arch]
    path = gguf_dir / f"tiny-{arch}-{qtype.name}.gguf"
    reference = write_gguf(path, arch, hf, vocab, qtype)
    model = load_model(path, torch.float32, "cpu", progress=False)

    expected_model = type(hf)(hf.config).eval()
    expected_model.load_state_dict(reference)
    prompts = make_prompts(hf.config.vocab_size, [7, 1, 13])
    runner = runner_cls(model)
    logits = runner.forward(prompts, [runner.take(len(p)) for p in prompts], all_rows=True)
    with torch.no_grad():
        expected = torch.cat([expected_model(torch.tensor([p])).logits[0] for p in prompts])
    err = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-4, f"{arch} {qtype.name}: relative error {err}"


def test_gguf_bf16_engine_dtype(hf_models, vocab, gguf_dir, cache_dir):
    """Weights are dequantised straight into the engine dtype."""
    path = gguf_dir / "tiny-bf16-target.gguf"
    reference = write_gguf(path, "llama", hf_models["llama"], vocab, Q.Q8_0)
    model = load_model(path, torch.bfloat16, "cpu", progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    embed = model.model.embed_tokens.weight
    assert torch.equal(embed, reference["model.embed_tokens.weight"].to(torch.bfloat16))


def test_gguf_tokenizer_and_chat_template(hf_models, vocab, gguf_dir, cache_dir):
    path = gguf_dir / "tiny-tokenizer.gguf"
    write_gguf(path, "llama", hf_models["llama"], vocab, Q.F16)
    tokenizer = load_tokenizer(model_metadata_dir(path))
    text = "The quick brown fox, 42 times: naïve café!\n  indented"
    assert tokenizer.encode(text, add_special_tokens=False) == vocab["hf"].encode(
        text, add_special_tokens=False
    )
    assert tokenizer.eos_token_id == vocab["eos"]
    messages = [{"role": "user", "content": "hello there"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nhello there</s>\n<|assistant|>\n"


def test_companion_is_cached_and_keyed_by_the_file(hf_models, vocab, gguf_dir, cache_dir):
    path = gguf_dir / "tiny-cache.gguf"
    write_gguf(path, "llama", hf_models["llama"], vocab, Q.F16)
    first = prepare_gguf(path)
    stamp = (first / "tokenizer.json").stat().st_mtime_ns
    assert prepare_gguf(path) == first
    assert (first / "tokenizer.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert first.is_relative_to(cache_dir)
    write_gguf(path, "llama", hf_models["llama"], vocab, Q.F32)  # the file changes
    assert prepare_gguf(path) != first


def test_directory_holding_one_gguf(hf_models, vocab, tmp_path, cache_dir):
    folder = tmp_path / "model"
    folder.mkdir()
    write_gguf(folder / "m.gguf", "qwen2", hf_models["qwen2"], vocab, Q.F16)
    assert find_gguf_file(folder) == folder / "m.gguf"
    assert load_model(folder, torch.float32, "cpu", progress=False).arch.architecture == (
        "Qwen2ForCausalLM"
    )
    write_gguf(folder / "n.gguf", "qwen2", hf_models["qwen2"], vocab, Q.F16)
    with pytest.raises(GGUFError, match="several GGUF files"):
        find_gguf_file(folder)


def test_unsupported_architecture_is_named(tmp_path, cache_dir):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'phi2'.*llama, qwen2"):
        load_model(path, torch.float32, "cpu", progress=False)


def test_missing_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_metadata_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        model_metadata_dir(tmp_path)
