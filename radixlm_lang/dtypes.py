"""``gen(dtype=...)``: SGLang's regexes for typed generations.

A typed gen is a constrained gen: the output must match the type's regex. As in SGLang, the
variable keeps the generated *text* (``"24"``, ``'"Paris"'``, ``"True"``); programs convert it
themselves (``int(s["hours"])``). Integers and floats also stop at a space or a newline, so a
number followed by whitespace ends the generation there.
"""

from __future__ import annotations

# SGLang's own patterns (``sglang.lang.ir``), kept verbatim so programs that import them and
# programs that rely on what they accept behave the same here.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""

_BY_TYPE: dict[type, tuple[str, tuple[str, ...]]] = {
    int: (REGEX_INT, (" ", "\n")),
    float: (REGEX_FLOAT, (" ", "\n")),
    bool: (REGEX_BOOL, ()),
    str: (REGEX_STR, ()),
}
_NAMES = {"int": int, "float": float, "bool": bool, "str": str}


def normalize_dtype(dtype: type | str) -> type:
    """``int``/``float``/``bool``/``str``, given as the type or its name (SGLang accepts both).

    Raises:
        TypeError: any other type.
    """
    resolved = _NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in _BY_TYPE:
        raise TypeError(f"gen(dtype=...) supports int, float, str and bool, not {dtype!r}")
    return resolved


def dtype_constraint(dtype: type) -> tuple[str, tuple[str, ...]]:
    """The regex that constrains a gen of ``dtype`` and the stop strings it adds."""
    return _BY_TYPE[normalize_dtype(dtype)]
