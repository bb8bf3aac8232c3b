"""GGUF checkpoints (the llama.cpp / Ollama format) as radixlm models.

The format itself is read by the ``gguf`` package (its reader and its dequantizers for every
quantisation type it knows: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and the rest), and the
translation to Hugging Face terms by ``transformers``' GGUF support: the config keys, the tensor
name map, the reversal of llama.cpp's Q/K row permutation, and the tokenizer with its chat
template. Nothing here decodes a quantised block by hand.

Rebuilding the tokenizer from GGUF metadata takes tens of seconds, so the HF-format companion of
a GGUF file (config.json and the tokenizer files, no weights) is built once and kept under
``~/.cache/radixlm/gguf/``, keyed by the file's resolved path, size and modification time. The
weights are never cached: they are dequantised from the GGUF file on every load, one tensor at a
time, straight into the model's parameters in the engine's dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from radixlm.model.arch import UnsupportedModelError

logger = logging.getLogger(__name__)

# GGUF ``general.architecture`` values radixlm runs. Mistral GGUFs say "llama" too.
GGUF_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
GGUF_MAGIC = b"GGUF"
COMPANION_VERSION = "v2"
_SOURCE_FILE = "radixlm_gguf_source.json"
_INDEX_FILE = "radixlm_gguf_tensors.json"


class GGUFError(ValueError):
    """A GGUF path that cannot be used (several candidates, split files, unreadable)."""


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file that starts with the GGUF magic bytes.

    Args:
        path: any path.

    Returns:
        True for a GGUF file, whatever its suffix.
    """
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def find_gguf_file(path: str | Path) -> Path | None:
    """The GGUF file a ``--model`` value names, if it names one.

    A directory with a config.json is a Hugging Face model directory and is never treated as
    GGUF, even when a .gguf file lies beside it.

    Args:
        path: a .gguf file, or a directory that may hold one.

    Returns:
        The GGUF file, or None when ``path`` is not GGUF (a Hugging Face directory, say).

    Raises:
        GGUFError: a directory with several .gguf files, or a split (multi-file) GGUF.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path if is_gguf_file(path) else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    candidates = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if not candidates:
        return None
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise GGUFError(f"{path} holds several GGUF files ({names}); pass one of them as the model")
    return candidates[0]


def _checked_architecture(reader, gguf_file: str | Path) -> str:
    arch = _string_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} in {gguf_file} is not supported; radixlm runs GGUF "
            f"models of the architectures {', '.join(GGUF_ARCHITECTURES)}"
        )
    split = reader.fields.get("split.count")
    if split is not None and int(split.parts[split.data[0]][0]) > 1:
        raise GGUFError(
            f"{gguf_file} is one part of a split GGUF; merge the parts first "
            "(llama.cpp's gguf-split --merge)"
        )
    return arch


def _string_field(reader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise GGUFError(f"GGUF metadata lacks {key}")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def companion_dir(gguf_file: str | Path, cache_dir: Path | None = None) -> Path:
    """Where the HF-format companion (config + tokenizer) of ``gguf_file`` is cached.

    Args:
        gguf_file: the GGUF file.
        cache_dir: cache root; defaults to ``$RADIXLM_CACHE`` or ``~/.cache/radixlm``.

    Returns:
        ``<cache>/gguf/<stem>-<key>``, the key hashing the resolved path, size and mtime, so an
        edited or replaced file gets a fresh companion.
    """
    from radixlm.model.demo import default_cache_dir

    resolved = Path(gguf_file).expanduser().resolve()
    stat = resolved.stat()
    ident = f"{COMPANION_VERSION}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "gguf" / f"{resolved.stem}-{key}"


def prepare_gguf(gguf_file: str | Path, cache_dir: Path | None = None) -> Path:
    """The Hugging Face-format companion directory of a GGUF file, built on first use.

    It holds config.json (from the GGUF metadata, as transformers reads it), the tokenizer
    files with the chat template (rebuilt by transformers from the GGUF vocabulary) and an index
    of where each tensor lies in the file, but no weights. Parsing GGUF metadata is slow (the
    reader walks every vocabulary string), so later loads read only this directory and map the
    tensor bytes directly. The build goes to a temporary directory moved into place with one
    rename, so concurrent loaders never see a half-written companion.

    Args:
        gguf_file: the GGUF file.
        cache_dir: cache root; defaults to ``$RADIXLM_CACHE`` or ``~/.cache/radixlm``.

    Returns:
        The companion directory.

    Raises:
        UnsupportedModelError: the GGUF architecture is not supported.
        GGUFError: the file cannot be used.
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    target = companion_dir(gguf_file, cache_dir)
    if (target / _SOURCE_FILE).is_file():
        return target
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    arch = _checked_architecture(reader, gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.warning(
            "converting the GGUF metadata of %s once (about a minute; cached in %s)",
            gguf_file,
            target,
        )
        _write_companion(gguf_file, reader, arch, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_companion(gguf_file: Path, reader, arch: str, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(where, gguf_file=name, local_files_only=True)
    config.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    names = _hf_names(arch, config)
    index = [
        {
            "name": t.name,
            "hf_name": names.get(t.name),
            "type": int(t.tensor_type),
            "offset": int(t.data_offset),
            "dtype": t.data.dtype.str,
            "shape": [int(d) for d in t.data.shape],
        }
        for t in reader.tensors
    ]
    (out_dir / _INDEX_FILE).write_text(json.dumps(index) + "\n")
    stat = gguf_file.stat()
    source = {
        "gguf_file": str(gguf_file),
        "architecture": arch,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    (out_dir / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _hf_names(arch: str, config) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, from the ``gguf`` package's name tables.

    transformers' ``get_gguf_hf_weights_map`` gives the same answer for these architectures but
    rebuilds the name table once per submodule (minutes for a 30-layer model on a busy CPU);
    one table over the parameter names of a meta-device skeleton suffices here.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers import AutoModelForCausalLM

    arch_enum = next(key for key, value in MODEL_ARCH_NAMES.items() if value == arch)
    table = get_tensor_name_map(arch_enum, config.num_hidden_layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names: dict[str, str] = {}
    for hf_name in skeleton.state_dict():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def gguf_tensor_count(config_dir: str | Path) -> int:
    """Number of tensors of the GGUF file a companion directory describes (for progress bars).

    Args:
        config_dir: the companion directory from :func:`prepare_gguf`.

    Returns:
        The tensor count.
    """
    return len(json.loads((Path(config_dir) / _INDEX_FILE).read_text()))


def iter_gguf_weights(
    gguf_file: str | Path, config_dir: str | Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantise the tensors of a GGUF file one at a time, under their Hugging Face names.

    Args:
        gguf_file: the GGUF file.
        config_dir: its companion directory (from :func:`prepare_gguf`).

    Yields:
        ``(hf_name, tensor)``: float32 tensors in the Hugging Face layout (Q and K rows back in
        the order the HF checkpoint had before llama.cpp permuted them). GGUF tensors with no
        Hugging Face counterpart (precomputed rope frequencies) are skipped.
    """
    from gguf import GGMLQuantizationType, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    config_dir = Path(config_dir)
    arch = json.loads((config_dir / _SOURCE_FILE).read_text())["architecture"]
    index = json.loads((config_dir / _INDEX_FILE).read_text())
    hf_config = json.loads((config_dir / "config.json").read_text())
    # The processor reverses llama.cpp's Q/K permutation (Llama) and is a no-op elsewhere.
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config)
    name_map = {entry["name"]: entry["hf_name"] for entry in index if entry["hf_name"]}
    for entry in index:
        data = np.memmap(
            gguf_file,
            dtype=np.dtype(entry["dtype"]),
            mode="r",
            offset=entry["offset"],
            shape=tuple(entry["shape"]),
        )
        weights = dequantize(data, GGMLQuantizationType(entry["type"]))
        result = processor.process(
            weights=weights, name=entry["name"], tensor_key_mapping=name_map, parsed_parameters={}
        )
        hf_name = name_map.get(result.name)
        if hf_name is None:
            logger.debug("GGUF tensor %s has no Hugging Face counterpart; skipped", entry["name"])
            continue
        yield hf_name, torch.from_numpy(np.require(result.weights, np.float32, ["C", "W"]))
