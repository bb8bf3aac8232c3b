"""``gen(dtype=...)``: the regex that constrains the output and the conversion of the result."""

from __future__ import annotations

import json
from typing import Any

# Numbers are bounded so the value fits a 64-bit integer / a double; the string is not (a bounded
# repetition of a large character class makes the token index blow up), max_new_tokens bounds it.
_REGEXES: dict[type, str] = {
    int: r"-?(0|[1-9][0-9]{0,17})",
    float: r"-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,8})?",
    bool: r"(True|False)",
    str: r'"[^"\\\x00-\x1f]*"',
}


class ConversionError(ValueError):
    """A constrained generation did not produce a value of the requested type."""


def dtype_regex(dtype: type) -> str:
    """The regex that forces text of ``dtype`` (int, float, bool or str, a JSON-quoted string).

    Raises:
        TypeError: for any other type.
    """
    try:
        return _REGEXES[dtype]
    except KeyError:
        supported = "int, float, str and bool"
        raise TypeError(f"gen(dtype=...) supports {supported}, not {dtype!r}") from None


def convert(text: str, dtype: type | None) -> Any:
    """Convert generated text to ``dtype`` (``None`` keeps the text).

    Raises:
        ConversionError: the text is not a value of that type (e.g. the output was cut short).
    """
    if dtype is None:
        return text
    try:
        if dtype is bool:
            return {"True": True, "False": False}[text]
        if dtype is str:
            value = json.loads(text)
            if not isinstance(value, str):
                raise ValueError("not a string")
            return value
        return dtype(text)
    except (KeyError, ValueError) as exc:
        raise ConversionError(f"{text!r} is not a {dtype.__name__}") from exc
