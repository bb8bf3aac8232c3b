"""A matcher never reaches a state where nothing is allowed (the engine would be stuck).

Random walks over allowed tokens, biased towards byte-fallback / partial UTF-8 tokens, through
bounded string slots, where a character left half spelled at the length bound used to leave no
way out.
"""

from __future__ import annotations

import json
import random

import pytest

from radixlm.constrained import GrammarCompiler
from radixlm.tokenizer.tokenizer import load_tokenizer

SCHEMAS = [
    {"type": "string", "maxLength": 2},
    {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 4}},
     "required": ["name"]},
    {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
]


@pytest.fixture(scope="module", params=["llama3_tokenizer_dir", "llama2_tokenizer_dir"])
def compiler(request):
    tokenizer = load_tokenizer(request.getfixturevalue(request.param))
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # Byte-level pieces of non-ASCII bytes, and SentencePiece <0xNN> byte fallbacks.
    odd = {i for i, p in enumerate(pieces) if p and (p.startswith("<0x") or not p.isascii())}
    with GrammarCompiler(tokenizer, backend="outlines") as comp:
        yield comp, tokenizer, odd


@pytest.mark.parametrize("schema", SCHEMAS, ids=["string", "object", "array"])
def test_random_walks_never_dead_end(compiler, schema):
    comp, tokenizer, odd_ids = compiler
    grammar = comp.compile_json_schema(json.dumps(schema))
    eos = tokenizer.eos_token_id
    rng = random.Random(0)
    for _ in range(12):
        matcher = grammar.matcher()
        for _ in range(24):
            allowed = matcher.allowed_token_ids()
            assert allowed, "a state with no allowed token"
            if allowed == [eos]:
                break
            # Prefer tokens that are not plain ASCII: they end mid-character most often.
            odd = [t for t in allowed if t in odd_ids and t != eos]
            token = rng.choice(odd if odd and rng.random() < 0.7 else allowed)
            if token == eos:
                break
            assert matcher.accept_token(token)
