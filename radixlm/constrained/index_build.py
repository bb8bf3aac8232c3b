"""Spec -> regex -> outlines-core ``Index``: the part of compilation that runs in a worker.

This module imports neither torch nor the engine, so compile workers start fast.

Two rewrites guard against outlines-core 0.2.14's ``Index`` behaviour:

- The regex ``R`` is indexed as ``\\x01(?:R)\\x00`` with fake one-byte tokens for the two
  sentinels. ``Index`` drops a token transition whose bytes leave an *accepting* DFA state
  (``1`` + ``.5`` in a number); with the end sentinel no state of ``R`` is accepting, so no
  transition is dropped, and "may end here" becomes "the ``\\x00`` token is allowed here". The
  start sentinel (never produced by a real token) keeps the DFA that regex-automata builds for
  unanchored search from exploding: ``"(a|\\\\")*{0,16}"``-style patterns otherwise take
  seconds to minutes to determinise.
- JSON string content is not in the regex at all (see :mod:`radixlm.constrained.content`), which
  removes the maxLength blow-up and the per-string cost of Unicode-wide DFA loops.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from outlines_core import Index, Vocabulary

from radixlm.constrained.errors import GrammarError
from radixlm.constrained.json_schema import (
    MAX_SLOTS,
    SLOT_BASE,
    JsonSchemaOptions,
    compile_json_any,
    compile_json_schema,
)
from radixlm.constrained.regex_util import PatternTranslator, alternation, escape_literal
from radixlm.constrained.vocab import TokenVocab

START = "\x01"
END = "\x00"
KINDS = ("json_schema", "json_object", "regex", "choices")


@dataclass(frozen=True)
class FakeIds:
    """Token ids past the real vocabulary for the sentinels and slot placeholders."""

    base: int

    @property
    def start(self) -> int:
        return self.base

    @property
    def end(self) -> int:
        return self.base + 1

    @property
    def eos(self) -> int:
        return self.base + 2

    def slot(self, index: int) -> int:
        return self.base + 3 + index


@dataclass(frozen=True)
class IndexPayload:
    """What a worker sends back: picklable, small, no live Rust object."""

    kind: str
    regex: str
    slots: tuple[tuple[str, int, int | None], ...]
    relaxed: tuple[str, ...]
    index_bytes: bytes
    separators: tuple[str, str] = (", ", ": ")


def build_vocabularies(vocab: TokenVocab, fake: FakeIds) -> dict[str, Vocabulary]:
    """The two outlines vocabularies: "json" (no control-byte tokens) and "regex".

    JSON text under our whitespace policy never contains a raw control byte, so the JSON
    vocabulary drops those tokens and reuses the bytes for sentinels and slot placeholders.
    """
    json_map: dict[bytes, list[int]] = {}
    regex_map: dict[bytes, list[int]] = {}
    for tid, data in enumerate(vocab.token_bytes):
        if not data:
            continue
        if min(data) >= 0x20:
            json_map.setdefault(data, []).append(tid)
        if 0 not in data and 1 not in data:
            regex_map.setdefault(data, []).append(tid)
    for table in (json_map, regex_map):
        table[END.encode()] = [fake.end]
        table[START.encode()] = [fake.start]
    for index in range(MAX_SLOTS):
        json_map[bytes([SLOT_BASE + index])] = [fake.slot(index)]
    return {"json": Vocabulary(fake.eos, json_map), "regex": Vocabulary(fake.eos, regex_map)}


def grammar_regex(kind: str, spec: Any, options: JsonSchemaOptions
                  ) -> tuple[str, tuple[tuple[str, int, int | None], ...], tuple[str, ...]]:
    """(regex, slots, relaxed) for one constraint.

    Raises:
        GrammarError: unknown kind, invalid spec, unsupported feature.
    """
    if kind == "json_schema":
        compiled = compile_json_schema(spec, options)
    elif kind == "json_object":
        compiled = compile_json_any(options, object_only=spec is None or bool(spec))
    elif kind == "regex":
        return _user_regex(spec), (), ()
    elif kind == "choices":
        return _choices_regex(spec), (), ()
    else:
        raise GrammarError(f"unknown constraint kind {kind!r} (expected one of {KINDS})",
                           feature="kind")
    slots = tuple((s.kind, s.min_length, s.max_length) for s in compiled.slots)
    return compiled.regex, slots, compiled.relaxed


def _user_regex(pattern: Any) -> str:
    if not isinstance(pattern, str):
        raise GrammarError(f"regex must be a string, got {type(pattern).__name__}",
                           feature="regex")
    translated = PatternTranslator(json_string=False, excluded=[(0, 1)]).translate_full(pattern)
    if translated is None:
        raise GrammarError(f"regex {pattern!r} matches nothing", feature="regex")
    return translated


def _choices_regex(choices: Any) -> str:
    if not isinstance(choices, (list, tuple)) or not choices or not all(
            isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings",
                           feature="choices")
    if any(ch in c for c in choices for ch in (START, END)):
        raise GrammarError("choices may not contain NUL or SOH characters", feature="choices")
    return alternation(escape_literal(c) for c in choices) or ""


def wrap(regex: str, dummy_prefix: bool) -> str:
    """The indexed regex: sentinels, plus the optional dummy space of SentencePiece."""
    lead = "(?: )?" if dummy_prefix else ""
    return START + lead + "(?:" + regex + ")" + END


def build_index(kind: str, spec: Any, options: JsonSchemaOptions, dummy_prefix: bool,
                vocabularies: dict[str, Vocabulary]) -> IndexPayload:
    """Compile one constraint to a pickled ``Index`` (the expensive, isolated step).

    Raises:
        GrammarError: from the spec, or when outlines-core cannot build the index.
    """
    regex, slots, relaxed = grammar_regex(kind, spec, options)
    if len(regex) > options.max_regex_chars:
        raise GrammarError("grammar too large: regex over "
                           f"{options.max_regex_chars} characters", feature="size")
    vocabulary = vocabularies["json" if kind.startswith("json") else "regex"]
    try:
        index = Index(wrap(regex, dummy_prefix), vocabulary)
    except BaseException as exc:  # outlines raises ValueError, pyo3 panics are BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise GrammarError(f"cannot build the token index: {str(exc)[:300]}",
                           feature="index") from None
    separators = (options.item_separator, options.key_separator)
    return IndexPayload(kind, regex, slots, relaxed, pickle.dumps(index), separators)
