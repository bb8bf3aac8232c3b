"""Fixtures for the constrained-decoding tests: real tokenizers, compilers (session-scoped)."""

from __future__ import annotations

import pytest


def _compiler(*args, **kwargs):
    from radixlm.constrained import GrammarCompiler  # lazy: GPU-only runs lack outlines-core

    return GrammarCompiler(*args, **kwargs)


@pytest.fixture(scope="session")
def llama3(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))


@pytest.fixture(scope="session")
def llama2(llama2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama2_tokenizer_dir))


@pytest.fixture(scope="session")
def compiler3(llama3):
    """llama3, outlines backend, builds in threads (no worker processes: faster tests)."""
    with _compiler(
        llama3,
        backend="outlines",
        vocab_size=128256 + 64,
        eos_token_ids=[128001, 128009],
        isolate=False,
    ) as compiler:
        yield compiler


@pytest.fixture(scope="session")
def compiler2(llama2):
    with _compiler(llama2, backend="outlines", isolate=False) as compiler:
        yield compiler


@pytest.fixture(scope="session")
def llg3(llama3):
    """llama3, the default backend (llguidance)."""
    with _compiler(
        llama3, backend="llguidance", vocab_size=128256 + 64, eos_token_ids=[128001, 128009]
    ) as compiler:
        yield compiler


@pytest.fixture(scope="session")
def llg2(llama2):
    with _compiler(llama2, backend="llguidance") as compiler:
        yield compiler


@pytest.fixture(scope="session")
def feed():
    """``feed(matcher, tokenizer, text)``: accept ``text`` token by token as the tokenizer
    splits it (mid-output text without a SentencePiece dummy space); True if all accepted."""

    def run(matcher, tokenizer, text: str) -> bool:
        if matcher.num_accepted:
            ids = matcher.retokenizer.encode(text)
        else:
            ids = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.accept_token(t) for t in ids)

    return run
