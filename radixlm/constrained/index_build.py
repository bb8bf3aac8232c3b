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

import numpy as np
from outlines_core import Index, Vocabulary

from radixlm.constrained.errors import GrammarError
from radixlm.constrained.json_schema import (
    SLOT_BASE,
    SLOT_RADIX,
    JsonSchemaOptions,
    compile_json_any,
    compile_json_schema,
)
from radixlm.constrained.regex_util import PatternTranslator, alternation, escape_literal

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

    def byte(self, value: int) -> int:
        """The fake one-byte token of placeholder byte ``value`` (0x02..0x1F)."""
        return self.base + 3 + value - SLOT_BASE

    def slot_path(self, index: int) -> tuple[int, int]:
        """The two fake tokens that spell slot ``index``'s placeholder."""
        return (self.byte(SLOT_BASE + index // SLOT_RADIX),
                self.byte(SLOT_BASE + index % SLOT_RADIX))


@dataclass(frozen=True)
class IndexPayload:
    """What a worker sends back: picklable, small, no live Rust object."""

    kind: str
    regex: str
    slots: tuple[tuple[str, int, int | None, tuple[str, ...]], ...]
    relaxed: tuple[str, ...]
    index_bytes: bytes
    separators: tuple[str, str] = (", ", ": ")


class TokenTables:
    """The tokens each vocabulary variant may index, with a padded byte matrix for filtering.

    Variant "json" drops tokens with a control byte (never in our JSON text, so those bytes
    can serve as sentinels and slot placeholders); variant "regex" drops only tokens with the
    sentinel bytes NUL and SOH.
    """

    def __init__(self, token_bytes: tuple[bytes | None, ...], fake: FakeIds):
        self.fake = fake
        self.variants = {"json": self._variant(token_bytes, 0x20),
                         "regex": self._variant(token_bytes, 0x02)}

    @staticmethod
    def _variant(token_bytes, lowest: int) -> tuple[np.ndarray, list[bytes], np.ndarray]:
        ids = [i for i, b in enumerate(token_bytes) if b and min(b) >= lowest]
        data = [token_bytes[i] for i in ids]
        width = max(len(b) for b in data)
        matrix = np.zeros((len(data), width), dtype=np.uint8)
        for row, b in enumerate(data):
            matrix[row, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        return np.array(ids, dtype=np.int64), data, matrix

    def fake_entries(self, variant: str) -> dict[bytes, list[int]]:
        """Sentinel and slot-placeholder tokens (ids past the real vocabulary)."""
        entries = {END.encode(): [self.fake.end], START.encode(): [self.fake.start]}
        if variant == "json":
            for value in range(SLOT_BASE, SLOT_BASE + SLOT_RADIX):
                entries[bytes([value])] = [self.fake.byte(value)]
        return entries

    def vocabulary(self, variant: str, keep: np.ndarray | None = None) -> Vocabulary:
        """An outlines Vocabulary of the variant's tokens (those where ``keep`` is True)."""
        ids, data, _ = self.variants[variant]
        table = self.fake_entries(variant)
        rows = range(len(ids)) if keep is None else np.nonzero(keep)[0]
        for row in rows:
            table.setdefault(data[row], []).append(int(ids[row]))
        return Vocabulary(self.fake.eos, table)

    def byte_vocabulary(self, variant: str) -> Vocabulary:
        """One token per byte (id = byte value), to read the regex DFA cheaply."""
        lowest = 0x20 if variant == "json" else 0x02
        table = {bytes([b]): [b] for b in range(lowest, 256)}
        for data in self.fake_entries(variant):
            table[data] = [data[0]]
        return Vocabulary(_BYTE_EOS, table)

    def plausible(self, variant: str, pairs: np.ndarray, singles: np.ndarray) -> np.ndarray:
        """Tokens whose every byte and every adjacent byte pair occurs somewhere in the DFA
        (a token failing this can never be accepted without crossing into a slot)."""
        _, data, matrix = self.variants[variant]
        lengths = np.fromiter((len(b) for b in data), dtype=np.int64, count=len(data))
        ok = singles[matrix[:, 0]]
        for col in range(1, matrix.shape[1]):
            live = lengths > col
            if not live.any():
                break
            ok &= ~live | (singles[matrix[:, col]] & pairs[matrix[:, col - 1], matrix[:, col]])
        return ok


_BYTE_EOS = 300


def grammar_regex(kind: str, spec: Any, options: JsonSchemaOptions
                  ) -> tuple[str, tuple, tuple[str, ...]]:
    """(regex, slots, relaxed) for one constraint.

    Raises:
        GrammarError: unknown kind, invalid spec, unsupported feature.
    """
    if kind == "json_schema":
        compiled = compile_json_schema(spec, options)
    elif kind == "json_object":
        compiled = compile_json_any(options, object_only=spec is None or bool(spec))
    elif kind == "regex":
        return user_regex(spec), (), ()
    elif kind == "choices":
        return choices_regex(spec), (), ()
    else:
        raise GrammarError(f"unknown constraint kind {kind!r} (expected one of {KINDS})",
                           feature="kind")
    slots = tuple((s.kind, s.min_length, s.max_length, s.excluded) for s in compiled.slots)
    return compiled.regex, slots, compiled.relaxed


def user_regex(pattern: Any) -> str:
    """A user regex re-emitted for the index (Python syntax in, sentinels kept out)."""
    if not isinstance(pattern, str):
        raise GrammarError(f"regex must be a string, got {type(pattern).__name__}",
                           feature="regex")
    translated = PatternTranslator(json_string=False, excluded=[(0, 1)]).translate_full(pattern)
    if translated is None:
        raise GrammarError(f"regex {pattern!r} matches nothing", feature="regex")
    return translated


def choices_regex(choices: Any) -> str:
    """The alternation of the literal choices."""
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
                tables: TokenTables, max_work: float = 4e8) -> IndexPayload:
    """Compile one constraint to a pickled ``Index`` (the expensive, isolated step).

    The index is built over the tokens that can occur in the DFA at all: a first index over
    single bytes reads the DFA's byte transitions, and tokens with a byte or an adjacent byte
    pair the DFA never takes are left out. ``Index`` costs one pass over its vocabulary per
    DFA state, so a key-heavy schema with 5,000 states drops from ~20 s to well under 1 s.

    Raises:
        GrammarError: from the spec, an index past ``max_work`` (DFA states x kept tokens: at
            ~20 ns each, the default is ~8 s of indexing), or outlines-core failing.
    """
    regex, slots, relaxed = grammar_regex(kind, spec, options)
    if len(regex) > options.max_regex_chars:
        raise GrammarError("grammar too large: regex over "
                           f"{options.max_regex_chars} characters", feature="size")
    variant = "json" if kind.startswith("json") else "regex"
    wrapped = wrap(regex, dummy_prefix)
    pairs, singles, states = _byte_statistics(_index(wrapped, tables.byte_vocabulary(variant)))
    keep = tables.plausible(variant, pairs, singles)
    if states * int(keep.sum()) > max_work:
        raise GrammarError(f"grammar too large: {states} DFA states x {int(keep.sum())} tokens",
                           feature="size")
    index = _index(wrapped, tables.vocabulary(variant, keep))
    separators = (options.item_separator, options.key_separator)
    return IndexPayload(kind, regex, slots, relaxed, pickle.dumps(index), separators)


def _index(regex: str, vocabulary: Vocabulary) -> Index:
    try:
        return Index(regex, vocabulary)
    except BaseException as exc:  # outlines raises ValueError, pyo3 panics are BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise GrammarError(f"cannot build the token index: {str(exc)[:300]}",
                           feature="index") from None


def _byte_statistics(byte_index: Index) -> tuple[np.ndarray, np.ndarray, int]:
    """(pairs[b1, b2], singles[b], number of states) of the DFA behind a one-byte index."""
    transitions = byte_index.get_transitions()
    position = {state: row for row, state in enumerate(transitions)}
    table = np.full((len(transitions) + 1, 256), len(transitions), dtype=np.int64)
    for state, out in transitions.items():
        for byte, nxt in out.items():
            if byte < 256:
                table[position[state], byte] = position.get(nxt, len(transitions))
    alive = table < len(transitions)
    alive[len(transitions)] = False
    pairs = np.zeros((256, 256), dtype=bool)
    for byte in np.nonzero(alive.any(axis=0))[0]:
        after = table[alive[:, byte], byte]
        pairs[byte] = alive[after].any(axis=0)
    return pairs, alive.any(axis=0), len(transitions)
