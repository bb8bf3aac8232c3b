"""Random-weight models: tiny ones for tests, real shapes for benchmarks.

Nothing can be downloaded here, so tests build models with ``transformers`` from a config,
save them as a real Hugging Face directory and load that with radixlm. Benchmarks that only need
the right shape (an 8B Llama on a GPU) skip transformers and disk entirely with
:func:`build_random_model`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from radixlm.model.arch import ModelArch
from radixlm.model.loader import build_empty_model, resolve_dtype
from radixlm.model.models.decoder import CausalLM

# Tiny shapes (fast on 2 CPU cores), per architecture.
_TINY_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_TINY_COMMON},
    "mistral": {"model_type": "mistral", "sliding_window": None, **_TINY_COMMON},
    "qwen2": {"model_type": "qwen2", **_TINY_COMMON},
    "qwen3": {"model_type": "qwen3", **_TINY_COMMON},
}

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# What every Llama 3 size shares: the tokenizer (vocabulary, BOS/EOS), GQA with 8 KV heads,
# RoPE base and norm epsilon.
_LLAMA3_COMMON = {
    "model_type": "llama",
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# Real model shapes (weights random). Names say which public model each one mirrors.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {  # Meta-Llama-3-8B
        **_LLAMA3_COMMON,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "head_dim": 128,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    "llama3-1b": {  # Llama-3.2-1B
        **_LLAMA3_COMMON,
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "head_dim": 64,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "rope_scaling": _LLAMA3_ROPE,
        "tie_word_embeddings": True,
    },
    "qwen2-0.5b": {  # Qwen2.5-0.5B
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "qwen3-0.6b": {  # Qwen3-0.6B
        "model_type": "qwen3",
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "llama3-70b": {  # Meta-Llama-3-70B (~141 GB in bf16: more than one H200 holds)
        **_LLAMA3_COMMON,
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "head_dim": 128,
        "intermediate_size": 28672,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    "mistral-7b": {  # Mistral-7B-v0.3
        "model_type": "mistral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 32768,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def config_dict(name: str, **overrides: Any) -> dict[str, Any]:
    """The HF-style config dict of a tiny arch ("llama", "mistral", "qwen2", "qwen3") or preset.

    Args:
        name: a key of TINY or PRESETS.
        overrides: config fields to replace.

    Returns:
        A fresh dict with ``model_type`` and the shape fields.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    table = {**TINY, **PRESETS}
    if name not in table:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(table)}")
    return {**table[name], **overrides}


def random_config(arch: str, **overrides: Any) -> Any:
    """A transformers config object for a tiny arch or a preset.

    Args:
        arch: "llama", "mistral", "qwen2", "qwen3" (tiny) or a PRESETS key.
        overrides: config fields to replace (e.g. ``tie_word_embeddings=True``,
            ``rope_scaling={...}``, ``sliding_window=8``).

    Returns:
        The ``transformers`` config (``LlamaConfig``, ...).
    """
    from transformers import AutoConfig

    fields = config_dict(arch, **overrides)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def make_random_model_dir(
    path: str | Path,
    arch: str = "llama",
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    shards: int = 1,
    dtype: str = "float32",
    **config_overrides: Any,
) -> Path:
    """Build a random-weight HF model with transformers and save it as a model directory.

    Every 1-D parameter (norm weights, biases) is perturbed away from HF's init (ones / zeros)
    so that tests exercise them.

    Args:
        path: directory to create (or fill).
        arch: tiny arch name or PRESETS key (presets are large: mind the disk).
        tokenizer_dir: tokenizer files to copy in; the model then takes its vocab_size, bos and
            eos ids from that tokenizer (unless overridden explicitly).
        seed: torch seed for the weights.
        shards: >1 saves that many (or more) safetensors shards with an index.
        dtype: dtype the weights are saved in.
        config_overrides: config fields to replace.

    Returns:
        ``path`` as a Path.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    overrides = {**_tokenizer_fields(tokenizer_dir), **config_overrides}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(random_config(arch, **overrides))
    _perturb_vectors(model, seed)
    model = model.to(resolve_dtype(dtype, "cpu"))
    model.save_pretrained(path, max_shard_size=_shard_bytes(model, shards))
    if shards > 1 and not (path / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"asked for {shards} shards but transformers saved one file")
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), path)
    return path


def _tokenizer_fields(tokenizer_dir: str | Path | None) -> dict[str, Any]:
    if tokenizer_dir is None:
        return {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


@torch.no_grad()
def _perturb_vectors(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    for param in model.parameters():
        if param.dim() == 1:
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _shard_bytes(model: torch.nn.Module, shards: int) -> int | str:
    if shards <= 1:
        return "1000GB"
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total // shards + 1


# Where the real Llama 3 tokenizer is looked for (first hit wins): this variable, then
# ``shared/tokenizers/llama3`` beside the repository and inside it.
LLAMA3_TOKENIZER_ENV = "RADIXLM_LLAMA3_TOKENIZER"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_LLAMA3_TOKENIZER_CANDIDATES = (
    _REPO_ROOT.parent / "shared" / "tokenizers" / "llama3",
    _REPO_ROOT / "shared" / "tokenizers" / "llama3",
)
# Presets with Llama 3's vocabulary (128,256 ids), which its tokenizer fits id for id.
LLAMA3_VOCAB_SIZE = 128256


def llama3_tokenizer_dir() -> Path | None:
    """The real Llama 3 tokenizer directory, or None when it is not on this machine.

    Returns:
        ``$RADIXLM_LLAMA3_TOKENIZER`` if set (it must exist), else the first of
        ``<repo>/../shared/tokenizers/llama3`` and ``<repo>/shared/tokenizers/llama3`` that
        holds a ``tokenizer.json``.

    Raises:
        FileNotFoundError: the environment variable names a directory without a tokenizer.
    """
    named = os.environ.get(LLAMA3_TOKENIZER_ENV)
    if named:
        path = Path(named)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"${LLAMA3_TOKENIZER_ENV}={named} has no tokenizer.json")
        return path
    for path in _LLAMA3_TOKENIZER_CANDIDATES:
        if (path / "tokenizer.json").is_file():
            return path
    return None


def preset_tokenizer_dir(preset: str) -> Path | None:
    """The real tokenizer a preset should use: Llama 3's for presets with its vocabulary.

    Args:
        preset: a key of :data:`PRESETS` or a tiny arch name.

    Returns:
        The tokenizer directory; None for presets of other vocabularies and, with a warning,
        when the Llama 3 tokenizer is not on this machine (callers then write a synthetic one).
    """
    spec = PRESETS.get(preset)
    if spec is None or spec["vocab_size"] != LLAMA3_VOCAB_SIZE:
        return None
    found = llama3_tokenizer_dir()
    if found is None:
        warnings.warn(
            f"the Llama 3 tokenizer was not found (set ${LLAMA3_TOKENIZER_ENV} or put it at "
            f"{_LLAMA3_TOKENIZER_CANDIDATES[0]}); --random-model {preset} uses a synthetic "
            "word-level tokenizer, on which JSON/regex constraints cannot be compiled",
            stacklevel=2)
    return found


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """Copy a tokenizer directory's files (not its README) into a model directory."""
    _copy_tokenizer(source, target)


def _copy_tokenizer(source: Path, target: Path) -> None:
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".md":
            shutil.copy2(file, target / file.name)


def build_random_model(
    preset_or_config: str | dict[str, Any] | ModelArch | Any,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> CausalLM:
    """A radixlm ``CausalLM`` with random weights, built straight on ``device``.

    No transformers model and no disk: an 8B shape needs only its own memory on the GPU.
    Matrices are N(0, 0.02), norm weights 1 + N(0, 0.1), biases N(0, 0.02), so nothing is
    zero (timings on zeros can flatter).

    Args:
        preset_or_config: a tiny arch name or PRESETS key, an HF config dict or object, or a
            ModelArch.
        dtype: weight dtype (a torch dtype or name for resolve_dtype).
        device: where to build it.
        seed: generator seed.

    Returns:
        The ``CausalLM`` in eval mode.
    """
    arch = _as_arch(preset_or_config)
    model = build_empty_model(arch, resolve_dtype(dtype, device, arch.torch_dtype), device)
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        _fill_random(name, param.data, gen)
    return model


def _as_arch(spec: str | dict[str, Any] | ModelArch | Any) -> ModelArch:
    if isinstance(spec, ModelArch):
        return spec
    if isinstance(spec, str):
        return ModelArch.from_hf_config(config_dict(spec))
    return ModelArch.from_hf_config(spec)


def _fill_random(name: str, data: torch.Tensor, gen: torch.Generator) -> None:
    if data.dim() > 1:
        data.normal_(0.0, 0.02, generator=gen)
    elif name.endswith("norm.weight"):
        data.normal_(1.0, 0.1, generator=gen)
    else:
        data.normal_(0.0, 0.02, generator=gen)
