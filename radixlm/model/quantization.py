"""Weight quantization at load time: which method a checkpoint asks for, and how its extra
tensors (weight scales, activation scales, KV-cache scales) map onto the model.

FP8 checkpoints come in the layout vLLM and SGLang read: each quantized projection has an
``float8_e4m3fn`` ``weight`` and a float32 ``weight_scale`` (one per tensor, shape [] or [1], or
one per output channel, shape [N] or [N, 1]); config.json carries ``quantization_config`` with
``quant_method`` "fp8" (or "compressed-tensors" with 8-bit float weights). A static
``input_scale`` is accepted and not used: activations are always quantized per token on the fly,
which is at least as accurate. KV-cache scales (``self_attn.k_scale`` / ``v_scale``, the older
single ``kv_scale``, or compressed-tensors' ``k_proj.output_scale`` / ``v_proj.output_scale``)
become the layer's FP8 KV-cache scales.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from radixlm.model.arch import UnsupportedModelError
from radixlm.model.layers.fp8 import FP8_DTYPE, Fp8Linear, quantize_rows

QUANTIZATION_CHOICES = ("auto", "none", "fp8")
# The decoder's projections (radixlm.model.models.decoder) that weight quantization applies
# to; the embedding, LM head and norms stay in the model dtype.
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

_KV_SCALE = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\.(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)$"
)
_INPUT_SCALE = re.compile(r"\.input_scale$")


def checkpoint_quantization(config: dict[str, Any]) -> str:
    """The weight quantization a config.json declares.

    Args:
        config: the parsed config.json.

    Returns:
        "fp8" or "none".

    Raises:
        UnsupportedModelError: a quantization method or FP8 variant radixlm cannot load
            (block-wise FP8 scales, integer formats, ...).
    """
    qc = config.get("quantization_config")
    if not qc:
        return "none"
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise UnsupportedModelError(
                f"block-wise FP8 checkpoints (weight_block_size={qc['weight_block_size']}) are "
                "not supported; only per-tensor or per-channel weight scales"
            )
        return "fp8"
    if method == "compressed-tensors" and _compressed_tensors_fp8(qc):
        return "fp8"
    raise UnsupportedModelError(
        f"unsupported quantization_config (quant_method={method or None!r}); radixlm loads "
        "fp8 (per-tensor or per-channel) checkpoints and unquantized ones"
    )


def _compressed_tensors_fp8(qc: dict[str, Any]) -> bool:
    groups = qc.get("config_groups") or {}
    if not groups:
        return False
    for group in groups.values():
        weights = group.get("weights") or {}
        if weights.get("num_bits") != 8 or weights.get("type") != "float":
            return False
        if weights.get("strategy", "tensor") not in ("tensor", "channel"):
            return False
    return True


def resolve_quantization(requested: str, model_dir: str | Path | None) -> str:
    """The method to load with: ``requested``, or for "auto" what the checkpoint declares.

    Args:
        requested: "auto", "none" or "fp8".
        model_dir: the directory holding config.json (None: no checkpoint config).

    Returns:
        "none" or "fp8".

    Raises:
        ValueError: an unknown method, or "none" for an FP8 checkpoint (its weights cannot run
            unquantized without a dequantizing load, which radixlm does not do).
        UnsupportedModelError: the checkpoint's own quantization is not supported.
    """
    if requested not in QUANTIZATION_CHOICES:
        raise ValueError(
            f"unknown quantization {requested!r}; choose one of {QUANTIZATION_CHOICES}"
        )
    declared = "none"
    config_file = Path(model_dir) / "config.json" if model_dir is not None else None
    if config_file is not None and config_file.is_file():
        declared = checkpoint_quantization(json.loads(config_file.read_text()))
    if requested == "auto":
        return declared
    if requested == "none" and declared == "fp8":
        raise ValueError(
            "the checkpoint is FP8-quantized (config.json quantization_config); load it with "
            "quantization='fp8' (or 'auto')"
        )
    return requested


def use_fp8_linears(model: torch.nn.Module) -> int:
    """Replace the decoder's projection layers (``QUANTIZED_LINEARS``) by ``Fp8Linear`` of the
    same shape, on the same device (call on the meta-device model, before materialising it).

    Args:
        model: a CausalLM.

    Returns:
        How many layers were replaced.

    Raises:
        ValueError: a projection that is not a plain nn.Linear (tensor parallelism's sharded
            layers: FP8 with tp_size > 1 is not supported).
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in QUANTIZED_LINEARS or isinstance(child, Fp8Linear):
                continue
            if type(child) is not torch.nn.Linear:
                raise ValueError(
                    f"fp8 quantization supports plain linear layers only, {name} is "
                    f"{type(child).__name__} (FP8 with tensor parallelism is not supported)"
                )
            layer = Fp8Linear(child.in_features, child.out_features, bias=child.bias is not None,
                              device=child.weight.device)  # fmt: skip
            setattr(parent, name, layer)
            replaced += 1
    return replaced


def kv_scale_target(hf_name: str) -> tuple[int, str] | None:
    """(layer, "k" | "v" | "kv") when ``hf_name`` is a KV-cache scale, else None."""
    match = _KV_SCALE.match(hf_name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) or match.group(3)


def is_input_scale(hf_name: str) -> bool:
    """Whether ``hf_name`` is a static activation scale (accepted, unused: see module doc)."""
    return _INPUT_SCALE.search(hf_name) is not None


def scale_value(src: torch.Tensor, hf_name: str) -> float:
    """A per-tensor scale as a float.

    Raises:
        ValueError: the tensor holds more than one value.
    """
    if src.numel() != 1:
        raise ValueError(f"{hf_name} should hold one scale, has shape {tuple(src.shape)}")
    return float(src.float().reshape(()))


def load_fp8_weight(dst: torch.Tensor, src: torch.Tensor, scale_dst: torch.Tensor) -> bool:
    """Fill an FP8 weight slot from a checkpoint tensor of the same shape.

    An FP8 tensor is copied as is (its ``weight_scale`` arrives as a tensor of its own); a
    high-precision one is quantized per output channel here, and its scales written too.

    Args:
        dst: [n, K] FP8 slot (a layer's weight, or one merged block of it).
        src: the checkpoint tensor, [n, K].
        scale_dst: [n] float32 slot of the same rows' scales.

    Returns:
        True when the scales were written (the source was high precision).
    """
    if src.dtype == FP8_DTYPE:
        dst.copy_(src)
        return False
    q, scale = quantize_rows(src.to(dst.device))
    dst.copy_(q)
    scale_dst.copy_(scale.view(-1))
    return True


def weight_scale_rows(src: torch.Tensor, rows: int, hf_name: str) -> torch.Tensor:
    """A checkpoint ``weight_scale`` as [rows] float32: a per-tensor scale is broadcast.

    Raises:
        ValueError: neither one value nor one per row.
    """
    flat = src.float().reshape(-1)
    if flat.numel() == 1:
        return flat.expand(rows)
    if flat.numel() == rows:
        return flat
    raise ValueError(
        f"{hf_name} has shape {tuple(src.shape)}: expected one scale per tensor or one per "
        f"output channel ({rows})"
    )
