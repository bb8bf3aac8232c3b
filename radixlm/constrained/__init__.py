"""Constrained decoding: JSON schema, regex and choices compiled to per-token masks.

    from radixlm.constrained import GrammarCompiler, GrammarError
    compiler = GrammarCompiler(tokenizer, backend="outlines", vocab_size=None)
    grammar = compiler.compile_json_schema(schema)      # or compile_regex / compile_choices /
    matcher = grammar.matcher()                          # compile_json_object / submit(kind, spec)
    matcher.fill_bitmask(bitmask, row); matcher.accept_token(token_id)

Names load lazily, so a compile worker importing a leaf module never pulls in torch.
See docs/constrained.md for the design, the supported JSON-schema features and the numbers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKENDS": "radixlm.constrained.compiler",
    "GrammarCompiler": "radixlm.constrained.compiler",
    "Grammar": "radixlm.constrained.base",
    "GrammarMatcher": "radixlm.constrained.base",
    "JumpForward": "radixlm.constrained.base",
    "GrammarError": "radixlm.constrained.errors",
    "allocate_token_bitmask": "radixlm.constrained.bitmask",
    "apply_token_bitmask": "radixlm.constrained.bitmask",
    "canonical_json": "radixlm.constrained.json_canonical",
    "grammar_json": "radixlm.constrained.json_canonical",
    "JsonSchemaOptions": "radixlm.constrained.json_schema",
    "compile_json_schema": "radixlm.constrained.json_schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radixlm.constrained' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
