"""Rewrites that let llguidance compile schemas it refuses, each accepting a superset.

llguidance refuses a whole schema over one part it does not handle: a ``pattern`` with
lookaround or a backreference, ``patternProperties`` whose regexes overlap, a recursive
``$ref`` with sibling keywords, or a subschema it proves unsatisfiable. A refusal is a failed
request, while relaxing that one part only widens what the grammar accepts (no valid instance
is lost), so the backend compiles first as given and, only when llguidance names one of these
errors, applies the matching rewrite and tries again (at most ``MAX_REPAIRS`` times). Each
rewrite is listed in ``Grammar.relaxed``; ``strict`` JSON options turn them off.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

# ids of JSON-pointer-addressable containers of subschemas (siblings of $ref we keep)
_REF_KEEP = ("$ref", "definitions", "$defs", "$id", "id", "$schema", "$anchor")
MAX_REPAIRS = 6


def prepare(schema: Any) -> tuple[Any, list[str]]:
    """Up-front rewrites for what llguidance compiles but gets wrong (rejecting valid input).

    ``minProperties``/``maxProperties`` on an object with optional properties: llguidance
    warns and then refuses every instance of that object; they are dropped instead.

    Returns:
        The schema (a copy when anything changed) and the notes for ``Grammar.relaxed``.
    """
    if not isinstance(schema, dict) or not _map_nodes(schema, _counts_optional, change=False):
        return schema, []
    fixed = copy.deepcopy(schema)
    _map_nodes(fixed, _counts_optional)
    return fixed, ["min/maxProperties on objects with optional properties not enforced"]


def _counts_optional(node: dict, change: bool = True) -> bool:
    if "minProperties" not in node and "maxProperties" not in node:
        return False
    properties = node.get("properties")
    required = node.get("required")
    if not isinstance(properties, dict) or not properties:
        return False
    if isinstance(required, list) and set(properties) <= set(required):
        return False
    if change:
        node.pop("minProperties", None)
        node.pop("maxProperties", None)
    return True


def repair(schema: Any, error: str, pattern_ok: Callable[[str], bool]) -> tuple[Any, str] | None:
    """One rewrite for llguidance's ``error``, or None when no rewrite applies.

    Args:
        schema: the schema llguidance refused (not modified).
        error: llguidance's error message.
        pattern_ok: whether llguidance accepts a regex as a string ``pattern``.

    Returns:
        ``(new schema, note for Grammar.relaxed)`` or None.
    """
    if not isinstance(schema, dict):
        return None
    if "circular references with sibling keys" in error:
        fixed = copy.deepcopy(schema)
        if _map_nodes(fixed, _drop_ref_siblings):
            return fixed, "$ref siblings ignored (recursive $ref; drafts 4-7 ignore them too)"
        target = re.search(r"not supported: \S*?(#\S*)", error)
        if target and _map_nodes(fixed, lambda node: _drop_all_of_ref(node, target.group(1))):
            return fixed, f"allOf: recursive {target.group(1)} not enforced"
        if target and _replace_pointer(fixed, target.group(1)[1:], {}):
            return fixed, f"recursive {target.group(1)} not enforced (any value)"
    if "float range" in error:
        fixed = copy.deepcopy(schema)
        if _map_nodes(fixed, _drop_huge_bounds):
            return fixed, "number bounds beyond 1e15 in magnitude ignored"
    if "are not disjoint" in error:
        fixed = copy.deepcopy(schema)
        if _map_nodes(fixed, _merge_pattern_properties):
            return fixed, "patternProperties: overlapping patterns merged (values: anyOf)"
    if "regex" in error or "lookaround" in error or "look-around" in error:
        fixed = copy.deepcopy(schema)
        if _map_nodes(fixed, lambda node: _drop_bad_patterns(node, pattern_ok)):
            return fixed, "pattern: regexes with lookaround/backreferences/inner anchors ignored"
    if "Unsatisfiable" in error or "unsatisfiable" in error:
        pointer = _processing_pointer(error, schema)
        if pointer:
            fixed = copy.deepcopy(schema)
            # llguidance refuses a `false` subschema too, even where the instance may simply
            # leave that part out; `{}` accepts a superset of whatever that part allowed
            if _replace_pointer(fixed, pointer, {}):
                return fixed, f"unsatisfiable subschema #{pointer} not enforced"
    return None


def _map_nodes(root: Any, fix: Callable[..., bool], change: bool = True) -> bool:
    """Apply ``fix`` to every schema-like dict in ``root`` (iteratively); True if any changed.

    With ``change=False`` only tells whether ``fix`` would change something (stops early).
    """
    changed = False
    stack = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            if not change:
                if fix(node, change=False):
                    return True
            else:
                changed |= fix(node)
            stack.extend(
                v for k, v in node.items() if k not in ("enum", "const", "examples", "default")
            )
        elif isinstance(node, list):
            stack.extend(node)
    return changed


def _drop_ref_siblings(node: dict) -> bool:
    if not isinstance(node.get("$ref"), str):
        return False
    extra = [k for k in node if k not in _REF_KEEP]
    for key in extra:
        del node[key]
    return bool(extra)


def _drop_all_of_ref(node: dict, ref: str) -> bool:
    members = node.get("allOf")
    if not isinstance(members, list):
        return False
    kept = [m for m in members if not (isinstance(m, dict) and m.get("$ref") == ref)]
    if len(kept) == len(members):
        return False
    node["allOf"] = kept or [{}]
    return True


def _drop_huge_bounds(node: dict) -> bool:
    changed = False
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= 1e15:
            del node[key]
            changed = True
    return changed


def _merge_pattern_properties(node: dict) -> bool:
    patterns = node.get("patternProperties")
    if not isinstance(patterns, dict) or len(patterns) < 2:
        return False
    merged = "|".join(f"(?:{p})" for p in patterns)
    node["patternProperties"] = {merged: {"anyOf": list(patterns.values())}}
    return True


def _drop_bad_patterns(node: dict, pattern_ok: Callable[[str], bool]) -> bool:
    changed = False
    pattern = node.get("pattern")
    if isinstance(pattern, str) and not pattern_ok(pattern):
        del node["pattern"]
        changed = True
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict):
        for key in [k for k in patterns if not pattern_ok(k)]:
            # keys the dropped regex matched fall to additionalProperties: widen it to admit
            # them (a superset: other undeclared keys may now take that schema too)
            value = patterns.pop(key)
            extra = node.get("additionalProperties", True)
            if extra is not True and extra != {}:
                node["additionalProperties"] = (
                    value if extra is False else {"anyOf": [extra, value]}
                )
            changed = True
    return changed


def _processing_pointer(error: str, schema: dict) -> str | None:
    """The JSON pointer llguidance names, if it is relative to the root document."""
    match = re.search(r"while processing (\S*?)#(/\S*)", error)
    if not match:
        return None
    root_ids = {
        "json-schema:///",
        str(schema.get("$id", "")).rstrip("#"),
        str(schema.get("id", "")).rstrip("#"),
    } - {""}
    return match.group(2) if match.group(1) in root_ids else None


def _replace_pointer(root: Any, pointer: str, value: Any) -> bool:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if not parts:
        return False
    node = root
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    last = parts[-1]
    if isinstance(node, dict) and last in node:
        node[last] = value
        return True
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
        return True
    return False
