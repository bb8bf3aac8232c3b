"""Engine-free size checks (radixlm/server/preflight.py) and the bytes-per-token bound."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from radixlm.server.common import max_bytes_per_token
from radixlm.server.preflight import Bounds, preflight

BOUNDS = Bounds(context_length=100, max_sequences=8, max_bytes_per_token=10)


def _check(model: str, body: dict):
    return preflight(model, json.dumps(body).encode(), BOUNDS)


def test_bodies_within_the_bounds_pass():
    assert _check("GenerateRequest", {"input_ids": [[1] * 100] * 8}) is None
    assert _check("CompletionRequest", {"prompt": ["x" * 1000] * 4, "n": 2}) is None
    assert (
        _check("ChatCompletionRequest", {"messages": [{"role": "user", "content": "y" * 1000}]})
        is None
    )
    # a text whose padding a template may strip is not counted
    assert (
        _check(
            "ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi" + " " * 5000}]}
        )
        is None
    )


@pytest.mark.parametrize(
    "model, body, status, param",
    [
        ("GenerateRequest", {"input_ids": [1] * 101}, 400, "input_ids"),
        ("GenerateRequest", {"text": ["a"] * 9}, 400, "text"),
        ("GenerateRequest", {"text": "x" * 1001}, 400, "text"),
        ("CompletionRequest", {"prompt": ["a"] * 3, "n": 3}, 400, "n"),
        ("CompletionRequest", {"prompt": [[1] * 101]}, 400, "prompt"),
        (
            "ChatCompletionRequest",
            {"messages": [{"role": "user", "content": "z" * 1001}]},
            400,
            "messages",
        ),
        (
            "ChatCompletionRequest",
            {"messages": [{"role": "user", "content": "z"}], "n": 9},
            400,
            "n",
        ),
        ("TokenizeRequest", {"prompt": "t" * 1001}, 400, "prompt"),
        ("DetokenizeRequest", {"tokens": [1] * 101}, 400, "tokens"),
        ("CompletionRequest", {"prompt": "x", "max_tokens": "4"}, 400, "max_tokens"),
    ],
)
def test_bodies_beyond_the_bounds_are_refused(model, body, status, param):
    error = _check(model, body)
    assert error is not None and error[0] == status and error[2] == param, error


def test_malformed_json_is_a_400():
    status, message, _ = preflight("GenerateRequest", b'{"text": ', BOUNDS)
    assert status == 400 and "JSON" in message


def test_bytes_per_token_bounds_real_tokenizations(llama3_tokenizer_dir, llama2_tokenizer_dir):
    samples = [
        "Hello world " * 50,
        " " * 300,
        "\n\n\n\t\t" * 40,
        "日本語のテキスト" * 30,
        "🙂🙃" * 50,
        "<|begin_of_text|>" * 5,
        "a" * 500,
        "0123456789" * 40,
    ]
    for directory in (llama3_tokenizer_dir, llama2_tokenizer_dir):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        per_token = max_bytes_per_token(tokenizer)
        assert per_token is not None and per_token >= 1
        for text in samples:
            ids = tokenizer.encode(text, add_special_tokens=False)
            # every token stands for at most per_token bytes: the bound never refuses a text
            # that would fit
            assert len(ids) * per_token >= len(text.encode()), (directory.name, text[:20])


def test_no_bound_for_a_tokenizer_that_drops_text(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # drops whitespace
    assert max_bytes_per_token(PreTrainedTokenizerFast(tokenizer_object=backend)) is None
    backend.pre_tokenizer = None
    backend.normalizer = normalizers.Strip()
    assert max_bytes_per_token(PreTrainedTokenizerFast(tokenizer_object=backend)) is None
