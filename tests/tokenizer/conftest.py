"""Tokenizers loaded once per test session (loading Llama 3's takes seconds)."""

from __future__ import annotations

import pytest

from radixlm.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    return load_tokenizer(llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def llama2_tokenizer(llama2_tokenizer_dir):
    return load_tokenizer(llama2_tokenizer_dir)


@pytest.fixture(scope="session", params=["llama3", "llama2"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")
