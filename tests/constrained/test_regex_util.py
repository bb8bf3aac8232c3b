"""Regex building blocks against brute-force oracles (Python ``re`` and plain arithmetic)."""

from __future__ import annotations

import json
import random
import re

import pytest

from radixlm.constrained import GrammarError
from radixlm.constrained.regex_util import (
    PatternTranslator,
    class_regex,
    complement,
    escape_literal,
    int_range_regex,
    json_char_regex,
)


def test_int_ranges_match_exactly_the_integers_in_range():
    rng = random.Random(0)
    bounds = [None, 0, 1, -1, 9, 10, 99, 100, -100, 12345, -98765]
    cases = [(lo, hi) for lo in bounds for hi in bounds]
    cases += [(rng.randint(-10**5, 10**5), rng.randint(-10**5, 10**5)) for _ in range(60)]
    for low, high in cases:
        regex = int_range_regex(low, high)
        if low is not None and high is not None and low > high:
            assert regex is None
            continue
        pattern = re.compile(regex)
        probes = {v + d for v in (low or 0, high or 0, 0, 10, 1000, -1000) for d in range(-30, 31)}
        for value in probes:
            expected = (low is None or value >= low) and (high is None or value <= high)
            assert bool(pattern.fullmatch(str(value))) == expected, (low, high, value)
        for spelling in ("01", "00", "+1", "1.0", ""):
            assert not pattern.fullmatch(spelling)


def test_escape_literal_round_trips_every_ascii_and_some_unicode():
    text = "".join(chr(c) for c in range(1, 128)) + "é日本\u2028"
    assert re.fullmatch(escape_literal(text), text)
    assert not re.fullmatch(escape_literal("a.b"), "axb")


def test_class_regex_matches_its_set():
    ranges = [(0x30, 0x39), (0x5B, 0x5E), (0x2D, 0x2D), (0xE9, 0xE9)]
    pattern = re.compile(class_regex(ranges))
    for cp in range(0x200):
        inside = any(lo <= cp <= hi for lo, hi in ranges)
        assert bool(pattern.fullmatch(chr(cp))) == inside, hex(cp)
    negated = re.compile(class_regex(complement([(0x22, 0x22)])))
    assert negated.fullmatch("a") and not negated.fullmatch('"')


def test_json_char_regex_spells_chars_like_json_dumps():
    pattern = re.compile(json_char_regex([(0, 0x10FFFF)]))
    for cp in list(range(0x80)) + [0xE9, 0x2028, 0x1F600]:
        spelled = json.dumps(chr(cp), ensure_ascii=False)[1:-1]
        assert pattern.fullmatch(spelled), repr(spelled)
    assert not pattern.fullmatch('"') and not pattern.fullmatch("\n")


@pytest.mark.parametrize("pattern, inside, outside", [
    ("^[a-z]+$", ["abc"], ["ab1", ""]),
    ("a1", ["a1", "xa1y"], ["a2", "a"]),
    (r"^\d{3}-\d{2}$", ["123-45"], ["12-345", "١٢٣-45"]),  # ECMA \d is ASCII
    (r"^\w+$", ["a_1"], ["é"]),
    (r"^[^a]$", ['"', "\\", "\n", "é"], ["a"]),
    ("^(?<word>ab)+$", ["abab"], ["aba"]),
    ("^a|b$", ["ax", "xb"], ["xa"]),
    (r"^\s$", [" ", "\t", "\u00a0"], ["x"]),
])
def test_ecma_patterns_over_json_spelling(pattern, inside, outside):
    regex = PatternTranslator(json_string=True).translate_search(pattern)
    for text in inside:
        assert re.fullmatch(regex, json.dumps(text, ensure_ascii=False)[1:-1]), text
    for text in outside:
        assert not re.fullmatch(regex, json.dumps(text, ensure_ascii=False)[1:-1]), text
    assert re.search(pattern.replace("?<", "?P<"), inside[0])  # the oracle agrees


def test_raw_regex_keeps_python_semantics_and_excludes_sentinels():
    translator = PatternTranslator(json_string=False, excluded=[(0, 1)])
    regex = translator.translate_full(r"(?i)(yes|no)[^x]\d.")
    for text in ["YES!1a", "no 9b"]:
        assert re.fullmatch(regex, text)
    for text in ["yes\x001a", "maybe", "yesx1a", "yes!1\n"]:
        assert not re.fullmatch(regex, text)


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=a)a", "(?!a)b", r"a\bb", "(?(1)a|b)"])
def test_unsupported_regex_features_raise(pattern):
    with pytest.raises(GrammarError) as info:
        PatternTranslator(json_string=False).translate_full(pattern)
    assert info.value.feature == "pattern"


def test_large_repetitions_are_relaxed_and_recorded():
    translator = PatternTranslator(json_string=True, max_repeat=16)
    regex = translator.translate_search("^a{2,100}$")
    assert re.fullmatch(regex, "a" * 300) and not re.fullmatch(regex, "a")
    assert translator.relaxed
