"""Regexes for JSON-schema string ``format`` values (the string content, without quotes).

Each is ASCII-only, so it reads the same in the decoded string and in its JSON spelling. They
follow the RFCs loosely on purpose where validators in the wild are loose (a format must never
reject what a common validator accepts).
"""

from __future__ import annotations

_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME_CORE = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?"
_OFFSET = r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_HEX = "[0-9a-fA-F]"
_H16 = _HEX + "{1,4}"
_IPV6 = (
    rf"(?:(?:{_H16}:){{7}}{_H16}"
    rf"|(?:{_H16}:){{1,7}}:"
    rf"|(?:{_H16}:){{1,6}}:{_H16}"
    rf"|(?:{_H16}:){{1,5}}(?::{_H16}){{1,2}}"
    rf"|(?:{_H16}:){{1,4}}(?::{_H16}){{1,3}}"
    rf"|(?:{_H16}:){{1,3}}(?::{_H16}){{1,4}}"
    rf"|(?:{_H16}:){{1,2}}(?::{_H16}){{1,5}}"
    rf"|{_H16}:(?::{_H16}){{1,6}}"
    rf"|:(?:(?::{_H16}){{1,7}}|:)"
    rf"|(?:{_H16}:){{6}}{_IPV4}|::(?:ffff:)?{_IPV4})"
)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL})*"
# URI characters (RFC 3986 unreserved, reserved and percent-encoding), as they appear in JSON:
# "/" is written unescaped by json.dumps, and no URI character needs a JSON escape.
_URI_CHAR = r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9a-fA-F]{2})"
_URI = rf"[A-Za-z][A-Za-z0-9+.\-]*:{_URI_CHAR}*"

FORMAT_REGEXES: dict[str, str] = {
    "date": _DATE,
    "time": _TIME_CORE + _OFFSET + "?",
    "date-time": _DATE + r"[Tt ]" + _TIME_CORE + _OFFSET,
    "duration": r"P(?:[0-9]+[YMWD])*(?:T(?:[0-9]+(?:\.[0-9]+)?[HMS])+)?",
    "email": r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*",
    "hostname": _HOSTNAME,
    "ipv4": _IPV4,
    "ipv6": _IPV6,
    "uuid": rf"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}",
    "uri": _URI,
    "url": _URI,
    "iri": _URI,
    "uri-reference": rf"{_URI_CHAR}*",
    "iri-reference": rf"{_URI_CHAR}*",
}
"""format name -> content regex. Formats not listed are treated as plain strings (relaxed)."""

NON_STRING_FORMATS = frozenset({"int32", "int64", "float", "double", "integer", "number"})
"""OpenAPI numeric formats: annotations on numbers, never string constraints."""
