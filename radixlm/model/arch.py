"""The model architecture, parsed once from a Hugging Face ``config.json``.

``ModelArch`` is the one place the runtime reads a model's shape from: the layers, the loader,
the KV pool sizing and the engine all take it instead of a transformers config object, so the
differences between config versions (transformers 4.x ``rope_theta``/``rope_scaling`` versus
5.x ``rope_parameters``, ``torch_dtype`` versus ``dtype``) are handled here and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# model_type -> architecture, for configs that lack an "architectures" list.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The config describes a model this runtime cannot run (architecture, rope type, ...)."""


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling parameters (``rope_type`` is ``linear`` or ``llama3``).

    Attributes:
        rope_type: "linear" (positions divided by ``factor``) or "llama3" (Llama 3.1 smoothing).
        factor: the scaling factor.
        low_freq_factor / high_freq_factor: llama3 band edges.
        original_max_position_embeddings: llama3 pre-training context length.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArch:
    """Shape and numerics of a decoder-only model.

    Attributes:
        architecture: the HF class name, one of SUPPORTED_ARCHITECTURES.
        vocab_size: rows of the embedding and of the LM head.
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA when fewer than num_heads).
        head_dim: size of one head (config.head_dim when given, else hidden/heads).
        intermediate_size: MLP width.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: rotary base.
        rope_scaling: None for plain rotary, else its parameters.
        max_position_embeddings: longest context the model was configured for.
        tie_word_embeddings: LM head shares the embedding matrix.
        attention_bias: q/k/v projections carry a bias (Qwen2 always; Llama/Qwen3 by config).
        o_proj_bias: the output projection carries a bias (Llama/Qwen3 attention_bias only).
        mlp_bias: gate/up/down projections carry a bias (Llama mlp_bias).
        qk_norm: per-head RMSNorm on q and k before rotary (Qwen3).
        sliding_window: attention window in tokens (Mistral), None when attention is full
            causal over every context the model accepts.
        eos_token_ids: every id that ends generation.
        bos_token_id: beginning-of-sequence id, if any.
        torch_dtype: the dtype the checkpoint declares ("bfloat16", ...), if any.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArch:
        """Parse ``<path>/config.json``.

        Args:
            path: a Hugging Face model directory.

        Returns:
            The parsed architecture.

        Raises:
            FileNotFoundError: no config.json there.
            UnsupportedModelError: architecture or feature not supported.
        """
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a Hugging Face model directory")
        return cls.from_hf_config(json.loads(config_file.read_text()))

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | Any) -> ModelArch:
        """Parse a config.json dict or a transformers config object.

        Args:
            config: the parsed JSON, or anything with ``to_dict()``.

        Returns:
            The parsed architecture.

        Raises:
            UnsupportedModelError: architecture or feature not supported.
        """
        cfg = config if isinstance(config, dict) else config.to_dict()
        arch = _architecture(cfg)
        _check_activation(cfg)
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope_theta, rope_scaling = _rope(cfg)
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or (_has_attn_bias_field(arch) and attn_bias),
            o_proj_bias=_has_attn_bias_field(arch) and attn_bias,
            mlp_bias=arch == "LlamaForCausalLM" and bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(arch, cfg),
            eos_token_ids=_id_tuple(cfg.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        )


def _architecture(cfg: dict[str, Any]) -> str:
    names = list(cfg.get("architectures") or [])
    if not names and cfg.get("model_type") in _MODEL_TYPE_TO_ARCH:
        names = [_MODEL_TYPE_TO_ARCH[cfg["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(names) or f"model_type={cfg.get('model_type')!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _check_activation(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"unsupported hidden_act {act!r}; only 'silu' is supported")


def _has_attn_bias_field(arch: str) -> bool:
    # Mistral hard-codes no bias; Qwen2 hard-codes q/k/v bias and no o_proj bias.
    return arch in ("LlamaForCausalLM", "Qwen3ForCausalLM")


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from 5.x ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    return float(theta), _scaling(rope_type, merged, cfg)


def _scaling(rope_type: str, params: dict[str, Any], cfg: dict[str, Any]) -> RopeScaling:
    if rope_type == "linear":
        return RopeScaling("linear", float(params["factor"]))
    original = params.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    return RopeScaling(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )


def _sliding_window(arch: str, cfg: dict[str, Any]) -> int | None:
    """The window that actually restricts attention, or None for full causal attention."""
    window = cfg.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        # Qwen applies its window only to some layers (layer_types); not supported here.
        layer_types = cfg.get("layer_types") or []
        if cfg.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise UnsupportedModelError(
                f"{arch} with use_sliding_window=true (per-layer sliding attention) "
                "is not supported"
            )
        return None
    if arch != "MistralForCausalLM" or window is None:
        return None
    if int(window) >= int(cfg.get("max_position_embeddings", 2048)):
        return None
    return int(window)


def _id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
