"""Regex building blocks shared by the grammar compilers.

Every regex produced here parses the same way under Python's ``re`` (used by tests) and under
Rust's ``regex-automata`` (used by outlines-core): no ``\\x{..}``, no ``\\p{..}``, no nested
classes, metacharacters escaped in both dialects' common subset, and non-ASCII characters
written literally.

Patterns written by users are parsed with Python's own regex parser and re-emitted from the
parse tree, which normalises dialect differences and lets us (1) keep the grammar sentinel bytes
out of every class, (2) translate JSON-schema ``pattern`` (ECMA-262, search semantics) into a
regex over the *JSON-escaped* form of a string, and (3) bound large repetitions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

try:  # Python >= 3.11
    import re._constants as sre
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

from radixlm.constrained.errors import GrammarError

MAX_CODEPOINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
Ranges = list[tuple[int, int]]

_META_OUTSIDE = set("\\.+*?()|[]{}^$")
_META_INSIDE = set("\\[]^-&~")
_JSON_SHORT_ESCAPES = {0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r"}


# ---- code point sets -------------------------------------------------------------------------


def normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sorted, merged, surrogate-free inclusive ranges."""
    out: Ranges = []
    for lo, hi in sorted(_drop_surrogates(ranges)):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _drop_surrogates(ranges: Iterable[tuple[int, int]]) -> Iterable[tuple[int, int]]:
    for lo, hi in ranges:
        if hi < SURROGATES[0] or lo > SURROGATES[1]:
            yield lo, hi
            continue
        if lo < SURROGATES[0]:
            yield lo, SURROGATES[0] - 1
        if hi > SURROGATES[1]:
            yield SURROGATES[1] + 1, hi


def complement(ranges: Ranges) -> Ranges:
    """All scalar values not in ``ranges``."""
    out: Ranges = []
    start = 0
    for lo, hi in normalize(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODEPOINT:
        out.append((start, MAX_CODEPOINT))
    return normalize(out)


def subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    """``ranges`` minus ``removed``."""
    return intersect(ranges, complement(removed))


def intersect(a: Ranges, b: Ranges) -> Ranges:
    """Code points in both ``a`` and ``b``."""
    out: Ranges = []
    for lo1, hi1 in normalize(a):
        for lo2, hi2 in normalize(b):
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return normalize(out)


def contains(ranges: Ranges, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def size(ranges: Ranges) -> int:
    return sum(hi - lo + 1 for lo, hi in ranges)


# ---- emission --------------------------------------------------------------------------------


def escape_literal(text: str) -> str:
    """A regex matching exactly ``text``."""
    return "".join(_escape_char(ord(ch), _META_OUTSIDE) for ch in text)


def _escape_char(cp: int, meta: set[str]) -> str:
    if cp < 0x20 or 0x7F <= cp <= 0xA0 or cp == 0xAD:
        return f"\\x{cp:02x}" if cp <= 0xFF else chr(cp)
    ch = chr(cp)
    return "\\" + ch if ch in meta else ch


def class_regex(ranges: Ranges) -> str | None:
    """A regex for one character of ``ranges`` (None if the set is empty)."""
    ranges = normalize(ranges)
    if not ranges:
        return None
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _escape_char(ranges[0][0], _META_OUTSIDE)
    negated = complement(ranges)
    if len(negated) < len(ranges):
        return "[^" + _class_body(negated) + "]"
    return "[" + _class_body(ranges) + "]"


def _class_body(ranges: Ranges) -> str:
    parts = []
    for lo, hi in ranges:
        first = _escape_char(lo, _META_INSIDE)
        if lo == hi:
            parts.append(first)
        elif hi == lo + 1:
            parts.append(first + _escape_char(hi, _META_INSIDE))
        else:
            parts.append(first + "-" + _escape_char(hi, _META_INSIDE))
    return "".join(parts)


def alternation(parts: Iterable[str | None]) -> str | None:
    """``(?:a|b|...)`` over the non-None parts, deduplicated; None if there are none."""
    unique = list(dict.fromkeys(p for p in parts if p is not None))
    if not unique:
        return None
    if len(unique) == 1:
        return unique[0]
    return "(?:" + "|".join(unique) + ")"


def group(regex: str) -> str:
    """``regex`` made safe to quantify."""
    if len(regex) == 1 or (len(regex) == 2 and regex[0] == "\\"):
        return regex
    if regex.startswith("[") and regex.endswith("]") and _single_class(regex):
        return regex
    return "(?:" + regex + ")"


def _single_class(regex: str) -> bool:
    depth_end = regex.find("]", 2 if regex.startswith("[^") else 1)
    while depth_end != -1 and regex[depth_end - 1] == "\\":
        depth_end = regex.find("]", depth_end + 1)
    return depth_end == len(regex) - 1


def repeat(regex: str, low: int, high: int | None) -> str:
    """``regex`` repeated between ``low`` and ``high`` (None = unbounded) times."""
    if high is not None and high == 0:
        return ""
    unit = group(regex)
    if (low, high) == (0, None):
        return unit + "*"
    if (low, high) == (1, None):
        return unit + "+"
    if (low, high) == (0, 1):
        return unit + "?"
    if (low, high) == (1, 1):
        return regex
    if high is None:
        return f"{unit}{{{low},}}"
    if low == high:
        return f"{unit}{{{low}}}"
    return f"{unit}{{{low},{high}}}"


# ---- JSON string content ---------------------------------------------------------------------


def json_char_regex(ranges: Ranges) -> str | None:
    """One *decoded* character of ``ranges``, as it appears inside a serialized JSON string.

    Quotes, backslashes and control characters are written escaped, the way ``json.dumps``
    writes them; everything else literally (``ensure_ascii=False``).
    """
    ranges = normalize(ranges)
    plain = subtract(ranges, [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)])
    parts = [class_regex(plain) if plain else None]
    if contains(ranges, 0x22):
        parts.append('\\\\"')
    if contains(ranges, 0x5C):
        parts.append("\\\\\\\\")
    controls = [cp for cp in range(0x20) if contains(ranges, cp)]
    parts.extend(_json_control_escape(cp) for cp in controls)
    return alternation(parts)


def _json_control_escape(cp: int) -> str:
    if cp in _JSON_SHORT_ESCAPES:
        return "\\\\" + _JSON_SHORT_ESCAPES[cp]
    hi, lo = f"{cp:02x}"
    lo_class = lo if lo.isdigit() else f"[{lo}{lo.upper()}]"
    return f"\\\\u00{hi}{lo_class}"


ANY_JSON_CHAR = json_char_regex([(0, MAX_CODEPOINT)])
"""Any character of a JSON string in canonical (``json.dumps``) form."""

FREE_JSON_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
"""Any character of a JSON string in any valid spelling (every escape form)."""


# ---- integer ranges --------------------------------------------------------------------------


def int_range_regex(low: int | None, high: int | None) -> str | None:
    """Decimal integers (JSON spelling: no leading zeros, ``-`` sign) in ``[low, high]``.

    Returns None when the range is empty.
    """
    if low is not None and high is not None and low > high:
        return None
    if low is None and high is None:
        return "-?(?:0|[1-9][0-9]*)"
    parts = []
    if low is None or low < 0:
        neg_high = -1 if high is None or high >= 0 else high
        mags = _nonneg_range(-neg_high, None if low is None else -low)
        parts.append("-" + group(mags) if mags else None)
    if high is None or high >= 0:
        parts.append(_nonneg_range(max(low or 0, 0), high))
    return alternation(parts)


def _nonneg_range(low: int, high: int | None) -> str | None:
    if high is None:
        width = len(str(low))
        bounded = _nonneg_range(low, 10**width - 1)
        return alternation([bounded, f"[1-9][0-9]{{{width},}}"])
    if low > high:
        return None
    parts = []
    while low <= high:
        top = min(high, 10 ** len(str(low)) - 1)
        parts.append(_same_width_range(str(low), str(top)))
        low = top + 1
    return alternation(parts)


def _same_width_range(low: str, high: str) -> str:
    if len(low) == 1:
        return low if low == high else f"[{low}-{high}]"
    if low[0] == high[0]:
        return low[0] + group(_same_width_range(low[1:], high[1:]))
    rest = len(low) - 1
    parts = []
    if low[1:] == "0" * rest:
        first_full = int(low[0])
    else:
        parts.append(low[0] + group(_same_width_range(low[1:], "9" * rest)))
        first_full = int(low[0]) + 1
    last_full = int(high[0]) if high[1:] == "9" * rest else int(high[0]) - 1
    if first_full <= last_full:
        digit = str(first_full) if first_full == last_full else f"[{first_full}-{last_full}]"
        parts.append(digit + repeat("[0-9]", rest, rest))
    if high[1:] != "9" * rest:
        parts.append(high[0] + group(_same_width_range("0" * rest, high[1:])))
    return alternation(parts) or ""


# ---- patterns written by users ---------------------------------------------------------------

_ECMA_DIGIT = [(0x30, 0x39)]
_ECMA_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_ECMA_SPACE = normalize(
    [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
     (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
)
_ECMA_LINE_TERMINATORS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]


class PatternTranslator:
    """Re-emits a regex from Python's parse tree in one of two target forms.

    Args:
        json_string: True for JSON-schema ``pattern`` (ECMA semantics, matched against the
            decoded string, emitted over its JSON-escaped spelling); False for a raw regex over
            the output text (Python semantics).
        excluded: code points no emitted class may match (the grammar's sentinel bytes).
        max_repeat: counted repetitions above this are relaxed (upper bound dropped, lower
            bound capped) and recorded in ``relaxed``; None keeps every bound exact.
    """

    def __init__(self, json_string: bool, excluded: Ranges = (), max_repeat: int | None = None):
        self.json_string = json_string
        self.excluded = normalize(excluded)
        self.max_repeat = max_repeat
        self.relaxed: list[str] = []

    def translate_full(self, pattern: str) -> str | None:
        """A regex matching exactly the strings ``pattern`` fully matches (None: no string).

        Raises:
            GrammarError: syntax this layer cannot express (backreferences, lookaround, ...).
        """
        tree = self._parse(pattern)
        return self._sequence(list(tree), tree.state.flags, edges=True)

    def translate_search(self, pattern: str) -> str | None:
        """JSON-string content whose decoded text *contains* a match of ``pattern`` (ECMA)."""
        tree = self._parse(pattern)
        flags = tree.state.flags
        items = list(tree)
        if len(items) == 1 and items[0][0] is sre.BRANCH:
            return alternation(self._search_branch(list(b), flags) for b in items[0][1][1])
        return self._search_branch(items, flags)

    def _search_branch(self, items: list, flags: int) -> str | None:
        anchored_start = bool(items) and _is_at(items[0], sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
        anchored_end = bool(items) and _is_at(items[-1], sre.AT_END, sre.AT_END_STRING)
        body = self._sequence(items, flags, edges=True)
        if body is None:
            return None
        anything = repeat(self._any_char(dotall=True), 0, None)
        return ("" if anchored_start else anything) + body + ("" if anchored_end else anything)

    def _parse(self, pattern: str):
        source = _ecma_to_python(pattern) if self.json_string else pattern
        try:
            return sre_parse.parse(source, 0)
        except Exception as exc:  # re.error, OverflowError, RecursionError
            raise GrammarError(f"invalid regex {pattern!r}: {exc}", feature="pattern") from None

    # -- tree walk --

    def _sequence(self, items: list, flags: int, edges: bool = False) -> str | None:
        if edges:
            if items and _is_at(items[0], sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
                items = items[1:]
            if items and _is_at(items[-1], sre.AT_END, sre.AT_END_STRING):
                items = items[:-1]
        out = []
        for op, arg in items:
            piece = self._node(op, arg, flags)
            if piece is None:
                return None
            out.append(piece)
        return "".join(out)

    def _node(self, op, arg, flags: int) -> str | None:
        if op is sre.LITERAL:
            return self._chars(self._casefold([(arg, arg)], flags))
        if op is sre.NOT_LITERAL:
            return self._chars(complement(self._casefold([(arg, arg)], flags)))
        if op is sre.ANY:
            return self._any_char(dotall=bool(flags & sre.SRE_FLAG_DOTALL))
        if op is sre.IN:
            return self._chars(self._class_set(arg, flags))
        if op is sre.BRANCH:
            return alternation(self._sequence(list(b), flags) for b in arg[1])
        if op is sre.SUBPATTERN:
            _group, add, remove, sub = arg
            return self._group(self._sequence(list(sub), (flags | add) & ~remove))
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT) or op is getattr(sre, "POSSESSIVE_REPEAT", None):
            return self._repeat(arg, flags)
        if op is getattr(sre, "ATOMIC_GROUP", None):
            return self._group(self._sequence(list(arg), flags))
        raise self._unsupported(op, arg)

    def _group(self, inner: str | None) -> str | None:
        return None if inner is None else "(?:" + inner + ")"

    def _repeat(self, arg, flags: int) -> str | None:
        low, high, sub = arg
        high = None if high is sre.MAXREPEAT else high
        inner = self._sequence(list(sub), flags)
        if inner is None:
            return "" if low == 0 else None
        if self.max_repeat is not None:
            if high is not None and high > self.max_repeat:
                self.relaxed.append(f"pattern repetition {{{low},{high}}} (upper bound dropped)")
                high = None
            if low > self.max_repeat:
                self.relaxed.append(f"pattern repetition {{{low},}} (lower bound capped)")
                low = self.max_repeat
        return repeat(inner, low, high) if inner else ""

    def _unsupported(self, op, arg) -> GrammarError:
        names = {
            sre.AT: "anchor or word boundary inside the pattern",
            sre.GROUPREF: "backreference",
            sre.GROUPREF_EXISTS: "conditional group",
            sre.ASSERT: "lookaround",
            sre.ASSERT_NOT: "negative lookaround",
        }
        what = names.get(op, str(op))
        return GrammarError(f"unsupported regex feature: {what}", feature="pattern")

    # -- character sets --

    def _class_set(self, items, flags: int) -> Ranges:
        negate = bool(items) and items[0][0] is sre.NEGATE
        ranges: Ranges = []
        for op, arg in items[1:] if negate else items:
            if op is sre.LITERAL:
                ranges.append((arg, arg))
            elif op is sre.RANGE:
                ranges.append(arg)
            elif op is sre.CATEGORY:
                ranges.extend(self._category(arg))
            else:
                raise self._unsupported(op, arg)
        ranges = self._casefold(ranges, flags)
        return complement(ranges) if negate else normalize(ranges)

    def _category(self, code) -> Ranges:
        table = _ecma_categories() if self.json_string else _python_categories()
        if code not in table:
            raise GrammarError(f"unsupported regex class {code}", feature="pattern")
        return table[code]

    @staticmethod
    def _casefold(ranges: Ranges, flags: int) -> Ranges:
        if not flags & sre.SRE_FLAG_IGNORECASE:
            return normalize(ranges)
        extra = []
        for lo, hi in ranges:
            for a, b, shift in ((0x41, 0x5A, 32), (0x61, 0x7A, -32)):
                s, e = max(lo, a), min(hi, b)
                if s <= e:
                    extra.append((s + shift, e + shift))
        return normalize(list(ranges) + extra)

    def _any_char(self, dotall: bool) -> str:
        everything = [(0, MAX_CODEPOINT)]
        if not dotall:
            lines = _ECMA_LINE_TERMINATORS if self.json_string else [(0x0A, 0x0A)]
            everything = subtract(everything, lines)
        return self._chars(everything) or ""

    def _chars(self, ranges: Ranges) -> str | None:
        ranges = subtract(ranges, self.excluded) if self.excluded else normalize(ranges)
        if self.json_string:
            return json_char_regex(ranges)
        return class_regex(ranges)


def _is_at(item, *codes) -> bool:
    return item[0] is sre.AT and item[1] in codes


def _ecma_to_python(pattern: str) -> str:
    """Spell the ECMA-only constructs the Python parser would reject or misread."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("(?<", i) and i + 3 < len(pattern) and pattern[i + 3] not in "=!":
            out.append("(?P<")
            i += 3
            continue
        if pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(pattern[i : i + 2])
            i += 2
            continue
        out.append(pattern[i])
        i += 1
    return "".join(out)


def _ecma_categories() -> dict:
    word, digit, space = _ECMA_WORD, _ECMA_DIGIT, _ECMA_SPACE
    return {
        sre.CATEGORY_DIGIT: digit, sre.CATEGORY_NOT_DIGIT: complement(digit),
        sre.CATEGORY_WORD: word, sre.CATEGORY_NOT_WORD: complement(word),
        sre.CATEGORY_SPACE: space, sre.CATEGORY_NOT_SPACE: complement(space),
    }


@functools.cache
def _python_categories() -> dict:
    """Python's Unicode ``\\d``, ``\\w``, ``\\s`` as code point ranges (a read-only constant)."""
    tables = {}
    for code, cls in ((sre.CATEGORY_DIGIT, r"\d+"), (sre.CATEGORY_WORD, r"\w+"),
                      (sre.CATEGORY_SPACE, r"\s+")):
        tables[code] = _scan(cls)
    tables[sre.CATEGORY_NOT_DIGIT] = complement(tables[sre.CATEGORY_DIGIT])
    tables[sre.CATEGORY_NOT_WORD] = complement(tables[sre.CATEGORY_WORD])
    tables[sre.CATEGORY_NOT_SPACE] = complement(tables[sre.CATEGORY_SPACE])
    return tables


def _scan(cls: str) -> Ranges:
    """Runs of code points matching ``cls``, found with one pass of ``re`` over all of them."""
    import re

    low = "".join(map(chr, range(SURROGATES[0])))
    high = "".join(map(chr, range(SURROGATES[1] + 1, MAX_CODEPOINT + 1)))
    ranges = [(m.start(), m.end() - 1) for m in re.finditer(cls, low)]
    offset = SURROGATES[1] + 1
    ranges += [(m.start() + offset, m.end() - 1 + offset) for m in re.finditer(cls, high)]
    return normalize(ranges)
