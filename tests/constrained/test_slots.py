"""The automata that walk slots outside the DFA: string content tables and the JSON-value walker."""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.constrained import content, jsonvalue
from radixlm.constrained.content import ContentTables

SEPARATORS = (", ", ": ")


def _scalar_walk(phase: int, data: bytes) -> tuple[int, int, int]:
    chars, exit_at = 0, -1
    for i, byte in enumerate(data):
        phase, done = content.step(phase, byte)
        chars += done
        if phase < 0:
            exit_at = i if phase == content.EXIT else -1
            break
    return phase, chars, exit_at


def test_content_tables_agree_with_the_scalar_automaton(llama3):
    from radixlm.constrained.vocab import build_token_vocab

    vocab = build_token_vocab(llama3)
    tables = ContentTables.build(vocab.token_bytes)
    rng = random.Random(0)
    sample = rng.sample(range(vocab.size - 256), 3000) + [vocab.token_bytes.index(b'\\"')]
    for tid in sample:
        data = vocab.token_bytes[tid]
        for phase in range(len(content.PHASES)):
            expected = _scalar_walk(phase, data)
            got = (tables.end[phase, tid], tables.chars[phase, tid], tables.exit_at[phase, tid])
            assert tuple(int(x) for x in got) == expected, (data, phase)


def test_content_automaton_counts_decoded_characters():
    for text in ["abc", "é日本🙂", 'a\\"b', "\\u00e9x", "tab\\there"]:
        phase, chars, exit_at = _scalar_walk(content.N, (text + '"').encode())
        decoded = json.loads('"' + text + '"')
        assert phase == content.EXIT and chars == len(decoded), text
    for bad in ["a\x01", "\\x", "\\u12g4", "\xff"]:
        data = bad.encode("latin-1") if bad == "\xff" else bad.encode()
        assert _scalar_walk(content.N, data + b'"')[0] == content.DEAD, bad


def walk_value(text: str) -> bool:
    """Whether the value walker accepts ``text`` as one complete JSON value."""
    walker = jsonvalue.JsonValueWalker(*(s.encode() for s in SEPARATORS))
    state = jsonvalue.START
    data = text.encode()
    for i, byte in enumerate(data):
        state = walker.step(state, byte)
        if state == jsonvalue.DONE_AFTER:
            return i == len(data) - 1
        if not isinstance(state, tuple):
            return False
    return bool(state[0] == "" and state[1] == jsonvalue.NUMBER
                and state[2] in (jsonvalue.ZERO, jsonvalue.INT, jsonvalue.FRAC,
                                 jsonvalue.EXP_DIGITS))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12)


def canonical(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=SEPARATORS)


@settings(max_examples=120, deadline=None)
@given(json_values)
def test_value_walker_accepts_every_canonical_value(value):
    assert walk_value(canonical(value))


@settings(max_examples=120, deadline=None)
@given(json_values, st.integers(0, 10**6), st.sampled_from(["delete", "insert", "replace"]),
       st.sampled_from(list('{}[]",: 0-.eEtrufalsn\\x')))
def test_value_walker_is_sound_on_mutations(value, where, how, char):
    text = canonical(value)
    i = where % (len(text) + 1)
    if how == "delete":
        mutated = text[:i] + text[i + 1:]
    elif how == "insert":
        mutated = text[:i] + char + text[i:]
    else:
        mutated = text[:i] + char + text[i + 1:]
    try:
        parsed = json.loads(mutated)
        is_canonical = canonical(parsed) == mutated
    except ValueError:
        parsed, is_canonical = None, False
    accepted = walk_value(mutated)
    if accepted:
        json.loads(mutated)  # never accepts invalid JSON
    if is_canonical:
        assert accepted, mutated
