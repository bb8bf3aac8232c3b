"""Fixtures for model tests: tiny random HF model directories (built once per session) and a
minimal hand-driven runner (slots assigned by hand, torch attention backend)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from radixlm.batch import ForwardBatch, ForwardMode
from radixlm.kvcache.pool import KVPool
from radixlm.model.attention.torch_backend import TorchAttentionBackend
from radixlm.model.loader import load_model
from radixlm.model.models.decoder import CausalLM
from radixlm.model.random_model import make_random_model_dir

ARCHS = ("llama", "mistral", "qwen2", "qwen3")

# Variants beyond the plain four, each exercising one feature against transformers.
VARIANTS: dict[str, dict] = {
    "llama": {"arch": "llama"},
    "mistral": {"arch": "mistral"},
    "qwen2": {"arch": "qwen2"},
    "qwen3": {"arch": "qwen3"},
    "llama_tied": {"arch": "llama", "tie_word_embeddings": True},
    "llama3_rope": {
        "arch": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    },
    "llama_linear_rope": {"arch": "llama", "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama_bias": {"arch": "llama", "attention_bias": True, "mlp_bias": True},
    "mistral_window": {"arch": "mistral", "sliding_window": 8},
    "llama_mha_wide_head": {"arch": "llama", "num_key_value_heads": 4, "head_dim": 32},
}


@pytest.fixture(scope="package", autouse=True)
def single_thread_torch():
    """Tiny models run ~10x faster on one intra-op thread when the CPU is shared (OpenMP
    barriers dominate matmuls this small); restored after this package's tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ModelDirs:
    """Builds each variant's model directory on first use, once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, Path] = {}

    def __call__(self, variant: str) -> Path:
        if variant not in self.built:
            spec = dict(VARIANTS[variant])
            arch = spec.pop("arch")
            self.built[variant] = make_random_model_dir(self.root / variant, arch=arch, **spec)
        return self.built[variant]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> ModelDirs:
    return ModelDirs(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], torch.nn.Module]:
    """transformers' own model for a directory, float32, cached per directory."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, torch.nn.Module] = {}

    def get(path: Path) -> torch.nn.Module:
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get


class Runner:
    """Drives a CausalLM by hand: a KV pool, a shuffled free list of slots, the torch backend."""

    def __init__(self, model: CausalLM, capacity: int = 1024, page_size: int = 1, seed: int = 0):
        arch = model.arch
        dtype = model.lm_head.weight.dtype
        self.model = model
        self.pool = KVPool(
            arch.num_layers, arch.num_kv_heads, arch.head_dim, capacity, page_size, dtype, "cpu"
        )
        first = self.pool.first_usable_slot
        self.free = list(range(first, first + self.pool.capacity_tokens))
        random.Random(seed).shuffle(self.free)  # deliberately non-contiguous slots
        self.attn = TorchAttentionBackend(sliding_window=arch.sliding_window)

    def take(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def forward(
        self,
        new_tokens: list[list[int]],
        seq_slots: list[list[int]],
        all_rows: bool = False,
        mode: ForwardMode | None = None,
    ) -> torch.Tensor:
        """Logits [L, vocab]: every new token's row when ``all_rows``, else each last one."""
        rows = [list(range(len(t))) for t in new_tokens] if all_rows else None
        batch = ForwardBatch.build(new_tokens, seq_slots, logits_rows=rows, mode=mode)
        return self.model(batch, self.pool, self.attn)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Batched greedy decoding (extend all prompts, then decode steps), stopping each
        sequence at an EOS id or after ``max_new_tokens`` tokens."""
        eos = set(self.model.arch.eos_token_ids)
        slots = [self.take(len(p)) for p in prompts]
        next_ids = self.forward(prompts, slots).argmax(-1).tolist()
        outputs: list[list[int]] = [[t] for t in next_ids]
        live = [i for i, t in enumerate(next_ids) if t not in eos]
        for _ in range(max_new_tokens - 1):
            if not live:
                break
            for i in live:
                slots[i] = slots[i] + self.take(1)
            tokens = self.forward([[outputs[i][-1]] for i in live], [slots[i] for i in live])
            for i, token in zip(live, tokens.argmax(-1).tolist()):
                outputs[i].append(token)
            live = [i for i in live if outputs[i][-1] not in eos]
        return outputs


@pytest.fixture(scope="session")
def loaded() -> Callable[[Path], CausalLM]:
    """radixlm's float32 model for a directory, cached per directory."""
    cache: dict[Path, CausalLM] = {}

    def get(path: Path) -> CausalLM:
        if path not in cache:
            cache[path] = load_model(path, torch.float32, "cpu", progress=False)
        return cache[path]

    return get


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token ids in [3, vocab) (clear of the tiny models' special ids 0-2)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="session")
def make_prompts() -> Callable[..., list[list[int]]]:
    return random_prompts


@pytest.fixture(scope="session")
def runner_cls() -> type[Runner]:
    return Runner
