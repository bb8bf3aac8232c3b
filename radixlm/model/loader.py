"""Load a local Hugging Face model directory or GGUF file into a ``CausalLM``.

The module is first built on the meta device (no memory), then materialised uninitialised
directly in the target dtype on the target device, and every checkpoint tensor is streamed from
its safetensors file into its slot, converted on the way. Host memory never holds more than one
checkpoint tensor at a time, so an 8B model loads without a full fp32 copy anywhere. GGUF
files (see :mod:`radixlm.model.gguf`) take the same path: each tensor is dequantised on its own
and copied into its slot in the engine dtype.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from radixlm.model.arch import ModelArch
from radixlm.model.gguf import find_gguf_file, gguf_tensor_count, iter_gguf_weights, prepare_gguf
from radixlm.model.layers.fp8 import Fp8Linear
from radixlm.model.models.decoder import STACKED_WEIGHTS, CausalLM
from radixlm.model.parallel import TensorParallel
from radixlm.model.quantization import (
    is_input_scale,
    kv_scale_target,
    load_fp8_weight,
    resolve_quantization,
    scale_value,
    use_fp8_linears,
    weight_scale_rows,
)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# Checkpoint tensors that carry no learned state of ours (rotary caches some exporters save).
_HARMLESS_EXTRA = re.compile(r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)$")

_PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias|weight_scale)$")


class MissingWeightsError(ValueError):
    """The checkpoint lacks tensors the model needs."""


class UnexpectedWeightsError(ValueError):
    """The checkpoint has tensors the model has no place for (a different architecture or a
    quantised checkpoint, most likely)."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is parsed by torch.

    Args:
        name: "auto", "cpu", "cuda", "cuda:N" or a torch.device.

    Returns:
        The device.
    """
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(
    name: str | torch.dtype, device: str | torch.device, config_dtype: str | None = None
) -> torch.dtype:
    """The activation/weight dtype to run with.

    ``auto`` is float32 on CPU (bf16 matmuls there are slow and imprecise). On GPU it is
    float16 when the checkpoint declares float16 (its weights were exported for that range),
    bfloat16 otherwise, float32 checkpoints included (serving in fp32 wastes half the HBM).

    Args:
        name: "auto", a dtype name ("float32", "bf16", "half", ...) or a torch.dtype.
        device: where the model will run.
        config_dtype: the ``dtype``/``torch_dtype`` string from config.json, if any.

    Returns:
        The torch dtype.

    Raises:
        ValueError: an unknown dtype name.
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32
        return torch.float16 if config_dtype == "float16" else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def build_empty_model(
    arch: ModelArch,
    dtype: torch.dtype,
    device: str | torch.device,
    tp: TensorParallel | None = None,
    quantization: str = "none",
) -> CausalLM:
    """A ``CausalLM`` whose parameters are allocated on ``device`` in ``dtype`` but hold
    garbage; only the rotary cache is computed. Fill it with :func:`load_weights` or random
    values.

    Args:
        arch: the architecture.
        dtype: parameter dtype.
        device: parameter device.
        tp: this rank's tensor-parallel group (the model then holds the rank's shard only).
        quantization: "none", or "fp8" for FP8 projection layers (their weights and scales
            keep their own dtypes; everything else is in ``dtype``).

    Returns:
        The model in eval mode, gradients off.
    """
    with torch.device("meta"):
        model = CausalLM(arch, tp)
        if quantization == "fp8":
            use_fp8_linears(model)
    model = model.to(dtype=dtype).to_empty(device=resolve_device(device))
    model.tie_weights()
    model.model.rotary_emb.rebuild_cache()
    return model.eval().requires_grad_(False)


def model_metadata_dir(path: str | Path) -> Path:
    """The directory with the config.json and tokenizer files of the model at ``path``.

    For a Hugging Face directory that is the directory itself; for a GGUF file (or a directory
    holding one) it is the cached companion directory :func:`radixlm.model.gguf.prepare_gguf`
    builds on first use.

    Args:
        path: a Hugging Face model directory, a .gguf file, or a directory holding one.

    Returns:
        The directory.

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a directory with neither config.json
            nor a .gguf file.
        radixlm.model.arch.UnsupportedModelError: a GGUF of an unsupported architecture.
        radixlm.model.gguf.GGUFError: a GGUF path that cannot be used.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:
        return prepare_gguf(gguf_file)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {str(path)!r} is neither a GGUF file nor a Hugging Face model directory"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {str(path)!r} holds neither config.json (a Hugging Face model) "
            "nor a .gguf file"
        )
    return path


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "auto",
    progress: bool = True,
    tp: TensorParallel | None = None,
    quantization: str = "auto",
    load_format: str = "auto",
) -> CausalLM:
    """Load a Hugging Face model directory or a GGUF file.

    Args:
        path: directory with config.json and model.safetensors (or sharded
            model-0000X-of-0000N.safetensors with model.safetensors.index.json); or a .gguf
            file, or a directory holding exactly one (dequantised to ``dtype`` on load).
        dtype: a torch dtype, or a name for :func:`resolve_dtype` ("auto" by default).
        device: where the weights go ("auto" = cuda when available).
        progress: show a tqdm bar while tensors load.
        tp: this rank's tensor-parallel group: the model holds the rank's shard, and only that
            slice of each safetensors tensor is read.
        quantization: "fp8" runs the projections in FP8 (an FP8 checkpoint loads as is, others
            are quantized per output channel); "none" keeps ``dtype``; "auto" follows the
            checkpoint's ``quantization_config`` (see :mod:`radixlm.model.quantization`).
        load_format: "auto" reads the weights; "dummy" fills them with random values and reads
            only config.json (benchmarks of shapes whose weights are not at hand).

    Returns:
        The model in eval mode, every weight loaded.

    Raises:
        FileNotFoundError: no such path, no config.json, or no safetensors files.
        radixlm.model.arch.UnsupportedModelError: architecture or feature not supported.
        MissingWeightsError / UnexpectedWeightsError: checkpoint does not match the config.
    """
    meta_dir = model_metadata_dir(path)
    arch = ModelArch.from_dir(meta_dir)
    device = resolve_device(device)
    method = resolve_quantization(quantization, meta_dir)
    model = build_empty_model(
        arch, resolve_dtype(dtype, device, arch.torch_dtype), device, tp, quantization=method
    )
    gguf_file = find_gguf_file(path)
    if load_format == "dummy":
        if method != "none":
            raise ValueError("load_format=dummy makes no FP8 weights; use quantization=none")
        fill_random_weights(model, seed=tp.rank if tp is not None else 0)
    elif load_format != "auto":
        raise ValueError(f"unknown load_format {load_format!r}; use auto or dummy")
    elif gguf_file is not None:
        load_tensors(
            model,
            iter_gguf_weights(gguf_file, meta_dir),
            total=gguf_tensor_count(meta_dir),
            progress=progress,
        )
    else:
        load_weights(model, checkpoint_files(meta_dir), progress=progress)
    return model


@torch.no_grad()
def fill_random_weights(model: CausalLM, seed: int = 0) -> None:
    """Random weights in place: matrices and biases N(0, 0.02), norm weights 1 + N(0, 0.1), so
    nothing is zero (timings on zeros can flatter) and activations stay finite.

    Args:
        model: a model from :func:`build_empty_model`.
        seed: generator seed.
    """
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.normal_(1.0, 0.1, generator=gen)
        else:
            param.normal_(0.0, 0.02, generator=gen)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model directory, in load order.

    Args:
        path: the model directory.

    Returns:
        The files named by model.safetensors.index.json, else model.safetensors, else every
        ``*.safetensors`` in the directory.

    Raises:
        FileNotFoundError: none found.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {path} (only the safetensors format is supported)"
        )
    return files


def load_weights(model: CausalLM, files: list[Path], progress: bool = True) -> None:
    """Stream every tensor of ``files`` into ``model``, converting dtype and device per tensor.

    Args:
        model: a model from :func:`build_empty_model`.
        files: safetensors files.
        progress: show a tqdm bar.

    Raises:
        MissingWeightsError: some parameter (or merged block of one) got no tensor.
        UnexpectedWeightsError: tensors with no place in the model.
    """
    plan = _LoadPlan(model)
    total = sum(len(keys) for _, keys in _file_keys(files))
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for file, keys in _file_keys(files):
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in keys:
                    plan.load(
                        name,
                        lambda n=name: handle.get_tensor(n),
                        lambda shard, n=name: _read_slice(handle, n, shard),
                    )
                    bar.update(1)
    plan.finish()


def _read_slice(handle, name: str, shard: tuple[int, int, int]) -> torch.Tensor:
    """Read only ``shard`` = (dim, start, length) of tensor ``name`` from a safetensors file."""
    dim, start, length = shard
    view = handle.get_slice(name)
    index = (slice(None),) * dim + (slice(start, start + length),)
    return view[index]


def load_tensors(
    model: CausalLM, tensors: Iterator[tuple[str, torch.Tensor]], total: int, progress: bool = True
) -> None:
    """Copy ``(hf_name, tensor)`` pairs into ``model``, converting dtype and device per tensor.

    Args:
        model: a model from :func:`build_empty_model`.
        tensors: checkpoint tensors under their Hugging Face names.
        total: how many pairs to expect (for the progress bar).
        progress: show a tqdm bar.

    Raises:
        MissingWeightsError: some parameter (or merged block of one) got no tensor.
        UnexpectedWeightsError: tensors with no place in the model.
    """
    plan = _LoadPlan(model)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for name, tensor in tensors:
            plan.load(name, lambda t=tensor: t)
            bar.update(1)
    plan.finish()


def _file_keys(files: list[Path]) -> Iterator[tuple[Path, list[str]]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            yield file, list(handle.keys())


class _LoadPlan:
    """Where each checkpoint tensor goes, and which targets are still missing."""

    def __init__(self, model: CausalLM):
        arch = model.arch
        self.params = dict(model.named_parameters())
        self.tied = arch.tie_word_embeddings
        # Tensor parallelism: this rank's heads, MLP columns and vocabulary rows.
        self.layout = model.layout
        self.head_dim = arch.head_dim
        q_size = self.layout.num_heads * arch.head_dim
        kv_size = self.layout.num_kv_heads * arch.head_dim
        inter = self.layout.intermediate_size
        self.blocks = {
            "qkv_proj": [q_size, kv_size, kv_size],
            "gate_up_proj": [inter, inter],
        }
        if self.layout.size > 1:
            # Vocabulary rows past the real vocabulary (padding to a multiple of the ranks) get
            # no checkpoint rows: zero them so the padded logits are finite and never sampled.
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in self.params:
                    self.params[name].data[self.layout.vocab_real_rows :].zero_()
        self.missing = {target for name in self.params for target in self._targets_of(name)}
        self.unexpected: list[str] = []
        # FP8 projections by module name, and the KV-cache scales the checkpoint carries.
        self.model = model
        self.fp8_layers = {
            name for name, module in model.named_modules() if isinstance(module, Fp8Linear)
        }
        self.kv_scales: dict[int, dict[str, float]] = {}

    def _targets_of(self, param_name: str) -> list[tuple[str, int | None]]:
        merged = param_name.split(".")[-2]
        if merged in self.blocks:
            return [(param_name, i) for i in range(len(self.blocks[merged]))]
        return [(param_name, None)]

    def load(self, hf_name: str, read, read_slice=None) -> None:
        """Copy checkpoint tensor ``hf_name`` into its slot.

        Args:
            hf_name: the checkpoint name.
            read: ``read()`` returns the whole tensor (called lazily).
            read_slice: ``read_slice((dim, start, length))`` returns only that part; used under
                tensor parallelism when given, else the whole tensor is read and narrowed.
        """
        if self._load_scale_only(hf_name, read):
            return
        target = self._target(hf_name)
        if target is None:
            return
        if target[0] not in self.params:
            self.unexpected.append(hf_name)
            return
        dst = self._slot(*target)
        shard = self.layout.checkpoint_slice(hf_name, self.head_dim)
        if shard is None:
            src = read()
        elif read_slice is not None:
            src = read_slice(shard)
        else:
            src = read().narrow(*shard)
        if shard is not None and shard[0] == 0 and shard[2] < dst.shape[0]:
            dst = dst.narrow(0, 0, shard[2])  # the rank's last vocabulary rows are padding
        if target[0].endswith(".weight_scale"):
            src = weight_scale_rows(src, dst.shape[0], hf_name)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"weight {hf_name} has shape {tuple(src.shape)}, the config implies "
                f"{tuple(dst.shape)}"
            )
        module, kind = target[0].rsplit(".", 1)
        if kind == "weight" and module in self.fp8_layers:
            scale_target = (f"{module}.weight_scale", target[1])
            if load_fp8_weight(dst, src, self._slot(*scale_target)):
                self.missing.discard(scale_target)
        else:
            dst.copy_(src)
        self.missing.discard(target)

    def _load_scale_only(self, hf_name: str, read) -> bool:
        """KV-cache scales (kept for the pool) and static activation scales (unused)."""
        kv = kv_scale_target(hf_name)
        if kv is not None and kv[0] < len(self.model.kv_scales):
            value = scale_value(read(), hf_name)
            for which in ("k", "v") if kv[1] == "kv" else (kv[1],):
                self.kv_scales.setdefault(kv[0], {})[which] = value
            return True
        return bool(self.fp8_layers) and is_input_scale(hf_name)

    def _target(self, hf_name: str) -> tuple[str, int | None] | None:
        if _HARMLESS_EXTRA.match(hf_name):
            return None
        if hf_name == "lm_head.weight" and self.tied:
            return None  # some exporters save the tied head too; the embedding is the source
        match = _PROJ.search(hf_name)
        if match is None:
            return hf_name, None
        merged, block = STACKED_WEIGHTS[match.group(1)]
        return f"{hf_name[: match.start()]}.{merged}.{match.group(2)}", block

    def _slot(self, param_name: str, block: int | None) -> torch.Tensor:
        data = self.params[param_name].data
        if block is None:
            return data
        sizes = self.blocks[param_name.split(".")[-2]]
        return data.narrow(0, sum(sizes[:block]), sizes[block])

    def finish(self) -> None:
        for name in self.fp8_layers:
            self.model.get_submodule(name).weights_changed()
        for layer, scales in self.kv_scales.items():
            k, v = self.model.kv_scales[layer]
            self.model.kv_scales[layer] = (scales.get("k", k), scales.get("v", v))
        if self.unexpected:
            raise UnexpectedWeightsError(
                f"checkpoint has {len(self.unexpected)} unexpected weight(s): "
                f"{_summary(self.unexpected)}"
            )
        if self.missing:
            names = sorted(_hf_name(name, block) for name, block in self.missing)
            raise MissingWeightsError(
                f"checkpoint is missing {len(names)} weight(s): {_summary(names)}"
            )


_UNSTACK = {(merged, block): hf for hf, (merged, block) in STACKED_WEIGHTS.items()}


def _hf_name(param_name: str, block: int | None) -> str:
    """The checkpoint name a (possibly merged) parameter block is loaded from."""
    if block is None:
        return param_name
    prefix, merged, kind = param_name.rsplit(".", 2)
    return f"{prefix}.{_UNSTACK[(merged, block)]}.{kind}"


def _summary(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
