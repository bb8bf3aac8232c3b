"""Shared pieces of the end-to-end benchmarks: the roofline, random models, tables and JSON.

Roofline. A step of the model cannot beat the larger of its matmul FLOPs over the measured bf16
matmul rate and the bytes it must move over the measured HBM bandwidth (a device-to-device copy,
bytes read plus written, as the issue measures it). Bytes of a decode step: every weight read
once (the embedding table excepted: only the batch's rows are gathered, unless it is tied to the
LM head), the K and V of every context token read once, the new tokens' K and V written. FLOPs:
2 per weight per token through the decoder matrices, the LM head only for the rows whose logits
are computed (one per sequence), and 4 x heads x head_dim per (query, key) pair of causal
attention (QK^T and PV). A workload's roofline adds its prefill floors and its decode-step floors
(the engine runs prefill and decode as separate steps).

Random models. ``--random-model PRESET`` writes a real Hugging Face directory: config.json, a
synthetic word-level tokenizer covering the whole vocabulary (benchmarks feed token ids, so no
real tokenizer is needed and none has to travel to the GPU machine), and random bf16 safetensors
drawn on the GPU. Both radixlm and HF transformers then load the same files, so the HF baseline
runs on identical weights. The directory is cached (default: /dev/shm, else the temp dir) and
reused by later runs on the same machine; an 8B model takes 16 GB there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from radixlm.kvcache.pool import resolve_kv_dtype
from radixlm.model.arch import ModelArch
from radixlm.model.layers.fp8 import FP8_DTYPE
from radixlm.model.loader import resolve_device, resolve_dtype
from radixlm.model.quantization import resolve_quantization

SHARD_BYTES = 2 * 2**30
RANDOM_MODEL_FORMAT = "radixlm-bench-random-v1"


# ---------------------------------------------------------------------------- device ceilings


@dataclass(frozen=True)
class Ceilings:
    """The device's two ceilings: HBM bandwidth (GB/s, read + write) and matmul TFLOP/s."""

    hbm_gbps: float
    matmul_tflops: float
    measured: bool = True

    def floor_s(self, nbytes: float, flops: float) -> float:
        """Least time (s) of a step that moves ``nbytes`` and computes ``flops``."""
        return max(nbytes / (self.hbm_gbps * 1e9), flops / (self.matmul_tflops * 1e12))


def measure_ceilings(device: torch.device, hbm_gbps: float | None = None,
                     tflops: float | None = None) -> Ceilings:
    """Measure what is not given: a 1 GiB copy and an 8192^3 bf16 matmul on CUDA (smaller on
    CPU, where the figures are only indicative).

    Args:
        device: where to measure.
        hbm_gbps: known bandwidth, skips the copy.
        tflops: known matmul rate, skips the matmul.

    Returns:
        The ceilings; ``measured`` is False when both were given.
    """
    cuda = device.type == "cuda"
    bw = hbm_gbps or _copy_gbps(device, 2**29 if cuda else 2**24)
    rate = tflops or _matmul_tflops(device, 8192 if cuda else 512)
    return Ceilings(bw, rate, measured=hbm_gbps is None or tflops is None)


def _copy_gbps(device: torch.device, numel: int) -> float:
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = time_median(lambda: dst.copy_(src), device, repeats=20)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def _matmul_tflops(device: torch.device, n: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_median(lambda: a @ b, device, repeats=20)
    return 2 * n**3 / seconds / 1e12


def time_median(fn: Callable[[], Any], device: torch.device, repeats: int = 20,
                warmup: int = 3) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, the host clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# ---------------------------------------------------------------------------- model cost


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a model, counted from its parameters.

    Attributes:
        decoder_matmul_params: weights of the decoder layers' matrices (FLOPs per token / 2).
        lm_head_params: weights of the LM head (FLOPs per logits row / 2).
        decode_weight_bytes: bytes a decode step reads from weights.
        kv_bytes_per_token: K and V of one token over all layers.
        attn_flops_per_pair: FLOPs of one (query, key) pair over all layers.
    """

    decoder_matmul_params: int
    lm_head_params: int
    decode_weight_bytes: int
    kv_bytes_per_token: int
    attn_flops_per_pair: int

    @classmethod
    def of(cls, arch: ModelArch, dtype: torch.dtype = torch.bfloat16,
           weight_dtype: torch.dtype | None = None, kv_dtype: torch.dtype | None = None
           ) -> ModelCost:
        """Count from the architecture (parameters are built on the meta device: no memory).

        Args:
            arch: the architecture.
            dtype: the model dtype (embedding, LM head, norms; and the rest by default).
            weight_dtype: dtype of the decoder's matrices when quantized (FP8: 1 byte each,
                plus a float32 scale per output channel).
            kv_dtype: KV cache dtype, when not ``dtype``.
        """
        from radixlm.model.models.decoder import CausalLM

        with torch.device("meta"):
            model = CausalLM(arch)
        size = torch.empty(0, dtype=dtype).element_size()
        matrix_size = torch.empty(0, dtype=weight_dtype or dtype).element_size()
        kv_size = torch.empty(0, dtype=kv_dtype or dtype).element_size()
        decoder, head, total, embed, scales = 0, 0, 0, 0, 0
        for name, param in model.named_parameters():  # tied weights are listed once
            total += param.numel()
            if name.startswith("lm_head"):
                head = param.numel()
            elif "embed_tokens" in name:
                embed = param.numel()
            elif param.dim() == 2:
                decoder += param.numel()
                scales += param.shape[0]
        if arch.tie_word_embeddings:
            head, embed = embed, 0
        weight_bytes = (total - embed - decoder) * size + decoder * matrix_size
        if weight_dtype is not None and matrix_size != size:
            weight_bytes += 4 * scales
        kv = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * kv_size
        return cls(decoder, head, weight_bytes, kv,
                   4 * arch.num_layers * arch.num_heads * arch.head_dim)

    def extend_flops(self, new_tokens: int, prefix_len: int, logits_rows: int = 1) -> float:
        """FLOPs of running ``new_tokens`` of one sequence after ``prefix_len`` cached ones."""
        pairs = new_tokens * prefix_len + new_tokens * (new_tokens + 1) / 2
        return (2 * self.decoder_matmul_params * new_tokens
                + 2 * self.lm_head_params * logits_rows + self.attn_flops_per_pair * pairs)

    def decode_step(self, context_lens: Sequence[int]) -> tuple[float, float]:
        """(bytes, FLOPs) of one decode step; ``context_lens`` include the new token."""
        tokens = sum(context_lens)
        batch = len(context_lens)
        nbytes = self.decode_weight_bytes + (tokens + batch) * self.kv_bytes_per_token
        flops = 2 * (self.decoder_matmul_params + self.lm_head_params) * batch
        return nbytes, flops + self.attn_flops_per_pair * tokens

    def extend_step(self, seqs: Sequence[tuple[int, int]]) -> tuple[float, float]:
        """(bytes, FLOPs) of one extend step over (new_tokens, prefix_len) sequences."""
        flops = sum(self.extend_flops(n, p) for n, p in seqs)
        kv = sum(n + p for n, p in seqs) * self.kv_bytes_per_token
        return self.decode_weight_bytes + kv, flops


@dataclass(frozen=True)
class StaticBatchRoofline:
    """Floors of one static batch: prefill, each decode step, and the whole run."""

    prefill_s: float
    decode_steps_s: list[float]

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.decode_steps_s)

    @property
    def decode_step_median_s(self) -> float:
        return statistics.median(self.decode_steps_s) if self.decode_steps_s else 0.0


def static_batch_roofline(cost: ModelCost, ceil: Ceilings, batch: int, input_len: int,
                          output_len: int) -> StaticBatchRoofline:
    """Prefill all prompts in one step, then ``output_len - 1`` decode steps (the first output
    token comes from the prefill)."""
    prefill = ceil.floor_s(*cost.extend_step([(input_len, 0)] * batch))
    steps = [ceil.floor_s(*cost.decode_step([input_len + t + 1] * batch))
             for t in range(output_len - 1)]
    return StaticBatchRoofline(prefill, steps)


@dataclass(frozen=True)
class WorkItem:
    """One request of a workload: prompt length, tokens of it served from cache, output length."""

    prompt_len: int
    cached_len: int
    output_len: int


def workload_roofline(cost: ModelCost, ceil: Ceilings, items: Sequence[WorkItem],
                      concurrency: int) -> float:
    """Least seconds for a workload: every uncached prompt token prefilled (FLOPs at the matmul
    rate; weights read once per wave), then decoding in waves of ``concurrency`` requests, each
    step at its own floor.

    Waves are the simplest schedule that respects the concurrency cap; continuous batching keeps
    the batch as full, so it needs no fewer steps.

    Args:
        cost: the model's cost.
        ceil: device ceilings.
        items: the requests.
        concurrency: most requests decoding at once (KV capacity and the engine's cap).

    Returns:
        Seconds.
    """
    waves = math.ceil(len(items) / max(concurrency, 1))
    flops = sum(cost.extend_flops(i.prompt_len - i.cached_len, i.cached_len) for i in items)
    kv_bytes = sum(i.prompt_len for i in items) * cost.kv_bytes_per_token
    prefill = ceil.floor_s(waves * cost.decode_weight_bytes + kv_bytes, flops)
    ordered = sorted(items, key=lambda i: i.output_len)
    decode = 0.0
    for start in range(0, len(ordered), concurrency):
        decode += _wave_decode_s(cost, ceil, ordered[start:start + concurrency])
    return prefill + decode


def _wave_decode_s(cost: ModelCost, ceil: Ceilings, wave: Sequence[WorkItem]) -> float:
    total = 0.0
    for t in range(max(i.output_len for i in wave) - 1):
        lens = [i.prompt_len + t + 1 for i in wave if i.output_len - 1 > t]
        total += ceil.floor_s(*cost.decode_step(lens))
    return total


# ---------------------------------------------------------------------------- random models


def default_model_cache() -> Path:
    """Where random model directories are cached: $RADIXLM_BENCH_CACHE, /dev/shm, or tmp."""
    if os.environ.get("RADIXLM_BENCH_CACHE"):
        return Path(os.environ["RADIXLM_BENCH_CACHE"])
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / "radixlm-bench-models"


def random_model_dir(preset: str, cache_dir: Path | None = None, seed: int = 0,
                     device: torch.device | str = "cpu", dtype: str = "bfloat16",
                     weights: bool = True) -> Path:
    """A Hugging Face directory with random weights of ``preset``, built on first use.

    Args:
        preset: a key of radixlm.model.random_model.PRESETS or a tiny arch name ("llama").
        cache_dir: parent directory; default :func:`default_model_cache`.
        seed: weight seed.
        device: where to draw the random numbers (a GPU is much faster for 8B).
        dtype: dtype of the saved weights.
        weights: False writes config and tokenizer only (for ``load_format="dummy"``).

    Returns:
        The directory (config.json, tokenizer files, model-*.safetensors).
    """
    from radixlm.model.random_model import preset_tokenizer_dir

    root = Path(cache_dir) if cache_dir is not None else default_model_cache()
    tokenizer_dir = preset_tokenizer_dir(preset)
    suffix = f"-tok-{tokenizer_dir.name if tokenizer_dir is not None else 'synthetic'}"
    target = root / f"{preset}-seed{seed}-{dtype}{suffix}{'' if weights else '-noweights'}"
    if (target / "done.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        write_random_model(staging, preset, seed, torch.device(device), dtype, tokenizer_dir,
                           weights)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_random_model(path: Path, preset: str, seed: int, device: torch.device,
                       dtype: str, tokenizer_dir: Path | None = None,
                       weights: bool = True) -> None:
    """Write config.json, a tokenizer and random safetensors shards into ``path``.

    The tokenizer is a copy of ``tokenizer_dir`` (a real one whose vocabulary fits the
    preset's), or a synthetic word-level one when None.
    """
    from radixlm.model.random_model import config_dict, copy_tokenizer_files

    config = config_dict(preset)
    config["architectures"] = [_architecture(config["model_type"])]
    config["torch_dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)
    else:
        write_synthetic_tokenizer(path, config["vocab_size"], config.get("bos_token_id"),
                                  config.get("eos_token_id"))
    if weights:
        _write_random_weights(path, config, seed, device, getattr(torch, dtype))
    (path / "done.json").write_text(json.dumps({"format": RANDOM_MODEL_FORMAT, "seed": seed}))


def _architecture(model_type: str) -> str:
    from radixlm.model.arch import _MODEL_TYPE_TO_ARCH

    return _MODEL_TYPE_TO_ARCH[model_type]


def write_synthetic_tokenizer(path: Path, vocab_size: int, bos_id: int | None,
                              eos_id: int | None) -> None:
    """A word-level tokenizer whose every id ``i`` is the word ``t{i}``: it decodes any id, so
    the engine's detokenizer runs on random outputs, and it needs nothing from disk.

    The words are stored byte-level (``Ġt{i}``, GPT-2's space marker) with a byte-level
    decoder, so grammar backends that read a vocabulary as bytes (llguidance, the default) can
    load it; decoding strips the first word's space, so ids 5 6 read ``t5 t6``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"\u0120t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="\u0120t0"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)])
    core.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    special = {name: f"\u0120t{i}" for name, i in (("bos_token", bos_id), ("eos_token", eos_id))
               if i is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="\u0120t0", **special)
    tokenizer.save_pretrained(path)


def _hf_parameter_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the HF model's parameters, from a meta-device instance."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


@torch.no_grad()
def _write_random_weights(path: Path, config: dict[str, Any], seed: int, device: torch.device,
                          dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, index, files = 0, {}, 0
    for name, shape in _hf_parameter_shapes(config):
        tensor = _random_tensor(name, shape, gen, device, dtype).cpu()
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            files += 1
            index.update(_save_shard(save_file, path, shard, files))
            shard, shard_bytes = {}, 0
    if shard:
        files += 1
        index.update(_save_shard(save_file, path, shard, files))
    weight_map = {"metadata": {}, "weight_map": index}
    (path / "model.safetensors.index.json").write_text(json.dumps(weight_map, indent=1))


def _save_shard(save_file, path: Path, shard: dict[str, torch.Tensor], number: int
                ) -> dict[str, str]:
    name = f"model-{number:05d}.safetensors"
    save_file(shard, str(path / name), metadata={"format": "pt"})
    return {key: name for key in shard}


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator,
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Matrices N(0, 0.02), norm weights 1 + N(0, 0.1), biases N(0, 0.02): nothing is zero."""
    out = torch.empty(shape, device=device, dtype=torch.float32)
    if name.endswith("norm.weight"):
        out.normal_(1.0, 0.1, generator=gen)
    else:
        out.normal_(0.0, 0.02, generator=gen)
    return out.to(dtype)


# ---------------------------------------------------------------------------- CLI pieces


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model / --random-model and the ceilings options shared by every benchmark."""
    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local Hugging Face model directory")
    source.add_argument("--random-model", metavar="PRESET",
                        help="random weights of a preset shape (llama3-8b, llama3-1b, "
                             "qwen2-0.5b, qwen3-0.6b, mistral-7b, or a tiny arch such as llama)")
    group.add_argument("--model-cache-dir", type=Path, default=None,
                       help="where --random-model directories are kept (default: /dev/shm)")
    group.add_argument("--seed", type=int, default=0, help="weights and workload seed")
    group.add_argument("--dtype", default="auto", help="engine dtype (auto = bf16 on GPU)")
    group.add_argument("--device", default="auto", help="cpu, cuda or auto")
    group.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    group.add_argument("--page-size", type=int, default=1)
    group.add_argument("--cuda-graph-max-batch-size", type=int, default=None,
                       help="decode CUDA graphs up to this batch (0 disables; engine default)")
    group.add_argument("--enable-overlap", action=argparse.BooleanOptionalAction, default=True,
                       help="overlap scheduling (--no-enable-overlap runs steps serially)")
    group.add_argument("--quantization", default="auto", choices=["auto", "none", "fp8"],
                       help="weight quantization (fp8: FP8 projections; auto: the checkpoint's)")
    group.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"],
                       help="KV cache storage dtype (auto: the model dtype)")
    group.add_argument("--tp-size", type=int, default=1,
                       help="tensor-parallel size (the roofline then counts that many devices)")
    group.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="dummy: random weights made on the devices; a --random-model "
                            "directory then holds no weights (shapes too large for the disk)")
    roof = parser.add_argument_group("roofline")
    roof.add_argument("--hbm-gbps", type=float, default=None,
                      help="HBM bandwidth (GB/s, read + write); measured when absent")
    roof.add_argument("--tflops", type=float, default=None,
                      help="bf16 matmul TFLOP/s; measured when absent")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


@dataclass(frozen=True)
class BenchSetup:
    """What a model benchmark resolves from its arguments before it runs anything."""

    device: torch.device
    model_dir: Path
    arch: ModelArch
    dtype: torch.dtype
    ceil: Ceilings
    weight_dtype: torch.dtype | None = None  # the decoder matrices' dtype when quantized
    kv_dtype: torch.dtype | None = None  # the KV cache's dtype when not ``dtype``

    @property
    def cost(self) -> ModelCost:
        return ModelCost.of(self.arch, self.dtype, self.weight_dtype, self.kv_dtype)


def resolve_setup(args: argparse.Namespace) -> BenchSetup:
    """Device, model directory (written first for ``--random-model``), dtype and ceilings."""
    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args, device)
    arch = ModelArch.from_dir(model_dir)
    dtype = resolve_dtype(args.dtype, device, arch.torch_dtype)
    fp8 = resolve_quantization(args.quantization, model_dir) == "fp8"
    ceil = measure_ceilings(device, args.hbm_gbps, args.tflops)
    if args.tp_size > 1:  # N devices: N times the bandwidth and FLOPs (all-reduces not counted)
        ceil = replace(ceil, hbm_gbps=ceil.hbm_gbps * args.tp_size,
                       matmul_tflops=ceil.matmul_tflops * args.tp_size)
    return BenchSetup(device, model_dir, arch, dtype, ceil,
                      weight_dtype=FP8_DTYPE if fp8 else None,
                      kv_dtype=resolve_kv_dtype(args.kv_cache_dtype, dtype))


def resolve_model_dir(args: argparse.Namespace, device: torch.device) -> Path:
    """The model directory named by ``--model``, or the cached ``--random-model`` one."""
    if args.model:
        return Path(args.model)
    if not args.random_model:
        raise SystemExit("give --model DIR or --random-model PRESET")
    return random_model_dir(args.random_model, args.model_cache_dir, args.seed, device,
                            weights=args.load_format != "dummy")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options every benchmark passes through."""
    opts = {"dtype": args.dtype, "device": args.device,
            "attention_backend": args.attention_backend, "page_size": args.page_size,
            "random_seed": args.seed, "enable_overlap": args.enable_overlap}
    if args.cuda_graph_max_batch_size is not None:
        opts["cuda_graph_max_batch_size"] = args.cuda_graph_max_batch_size
    if args.tp_size > 1:
        opts["tp_size"] = args.tp_size
    if args.load_format != "auto":
        opts["load_format"] = args.load_format
    if args.quantization != "auto":
        opts["quantization"] = args.quantization
    if args.kv_cache_dtype != "auto":
        opts["kv_cache_dtype"] = args.kv_cache_dtype
    return opts


# ---------------------------------------------------------------------------- output


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A right-aligned text table. ``columns``: (key, header) pairs; floats get 4 significant
    digits, missing values a dash."""
    header = [h for _, h in columns]
    body = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = [" ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += [" ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` (dataclasses converted) as indented JSON, if a path is given."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def run_header(device: torch.device, ceil: Ceilings, model_dir: Path) -> dict[str, Any]:
    """What every result file starts with: device, ceilings, model, versions, date."""
    import transformers

    return {"device": device_name(device), "model_dir": str(model_dir),
            "hbm_gbps": ceil.hbm_gbps, "matmul_tflops": ceil.matmul_tflops,
            "ceilings_measured": ceil.measured, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
