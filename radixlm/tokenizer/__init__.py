"""Tokenizer loading, chat templates and incremental detokenization (caller-process side)."""

from radixlm.tokenizer.detokenizer import IncrementalDetokenizer
from radixlm.tokenizer.tokenizer import (
    TokenizerError,
    apply_chat_template,
    encode,
    eos_token_ids,
    load_tokenizer,
)

__all__ = [
    "IncrementalDetokenizer",
    "TokenizerError",
    "apply_chat_template",
    "encode",
    "eos_token_ids",
    "load_tokenizer",
]
