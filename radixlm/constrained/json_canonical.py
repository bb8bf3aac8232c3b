"""Serialize an instance the way a compiled schema's grammar spells it.

The grammar fixes key order (declared properties in schema order, then the rest) and the
whitespace policy, so an instance is only comparable with the grammar once it is written that
way. Used by tests and by the benchmark to check valid instances token by token.
"""

from __future__ import annotations

import json
from typing import Any

from radixlm.constrained.json_schema import (
    JsonSchemaOptions,
    SchemaCompiler,
    _json_equal,
    _load,
    merge_schemas,
    property_schema,
)


def canonical_json(instance: Any, schema: Any, options: JsonSchemaOptions | None = None) -> str:
    """``instance`` serialized in the key order and whitespace the schema's grammar requires.

    Args:
        instance: a JSON value (normally valid under ``schema``).
        schema: the JSON schema (dict, bool or JSON text) the grammar was compiled from.
        options: the compiler options used for the grammar (separators, defaults).

    Returns:
        The JSON text.
    """
    return _Serializer(_load(schema), options or JsonSchemaOptions()).dump(instance, None, ())


class _Serializer:
    def __init__(self, root: Any, options: JsonSchemaOptions):
        self.options = options
        self.compiler = SchemaCompiler(root, options)
        self.root = root
        self._validator = None

    def dump(self, value: Any, schema: Any, stack: tuple) -> str:
        node, stack = self.compiler.resolve(self.root if schema is None else schema, stack)
        if isinstance(node, dict) and "_alts" in node:
            node = self._choose(value, node, stack)
        if not isinstance(node, dict):
            node = {}
        for literal in node.get("enum", []):
            if _json_equal(literal, value):
                return self.compiler.dumps(literal)
        if isinstance(value, dict):
            return self._object(value, node, stack)
        if isinstance(value, list):
            return self._array(value, node, stack)
        if isinstance(value, float) and value.is_integer() and self._wants_integer(node):
            value = int(value)
        return json.dumps(value, ensure_ascii=False)

    def _wants_integer(self, node: dict) -> bool:
        types = node.get("type")
        return types is not None and "integer" in types and "number" not in types

    def _object(self, value: dict, node: dict, stack: tuple) -> str:
        declared = list(node.get("properties") or {})
        declared += [r for r in node.get("required", []) if r not in declared]
        order = [k for k in declared if k in value] + [k for k in value if k not in declared]
        sep, key_sep = self.options.item_separator, self.options.key_separator
        members = []
        for key in order:
            sub = property_schema(node, key, self.options) if node else True
            members.append(
                json.dumps(key, ensure_ascii=False) + key_sep + self.dump(value[key], sub, stack)
            )
        return "{" + sep.join(members) + "}"

    def _array(self, value: list, node: dict, stack: tuple) -> str:
        prefix = node.get("prefixItems", [])
        rest = node.get("items", True)
        items = [
            self.dump(v, prefix[i] if i < len(prefix) else rest, stack) for i, v in enumerate(value)
        ]
        return "[" + self.options.item_separator.join(items) + "]"

    def _choose(self, value: Any, node: dict, stack: tuple) -> Any:
        """Merge in, from each anyOf/oneOf list, the first alternative ``value`` satisfies."""
        base = {k: v for k, v in node.items() if k != "_alts"}
        chosen = [
            next((alt for alt in alts if self._valid(value, alt)), alts[0])
            for alts in node["_alts"]
        ]
        merged: Any = base
        for alt in chosen:
            resolved, _ = self.compiler.resolve(alt, stack)
            merged = merge_schemas(merged, resolved)
        if isinstance(merged, dict) and "_alts" in merged:
            return self._choose(value, merged, stack)
        return merged

    def _valid(self, value: Any, schema: Any) -> bool:
        validator = self._root_validator()
        try:
            return validator.evolve(schema=schema).is_valid(value)
        except Exception:  # unresolvable refs, invalid subschemas: cannot tell
            return False

    def _root_validator(self):
        if self._validator is None:
            import jsonschema

            cls = jsonschema.validators.validator_for(self.root, default=jsonschema.Draft7Validator)
            self._validator = cls(self.root)
        return self._validator


def grammar_json(
    instance: Any,
    grammar: Any,
    item_separator: str = ", ",
    key_separator: str = ": ",
    budget: int = 20_000,
) -> str | None:
    """``instance`` spelled the way a compiled grammar accepts it, found by asking the grammar.

    A grammar fixes key order and may fix how a number is spelled (an ``enum`` of ``0.0`` is
    written ``0`` by some compilers), and backends differ in both. This walks the instance with
    a matcher: object members are placed by a depth-first search over key orders (the
    instance's own order first: pass ``json.loads(canonical_json(...))`` for a good first
    guess), numbers try their equivalent spellings (``1`` / ``1.0``). Any backend, any schema.

    Args:
        instance: a JSON value.
        grammar: a compiled :class:`~radixlm.constrained.base.Grammar`.
        item_separator: the separator between items the grammar was compiled with.
        key_separator: the separator after keys the grammar was compiled with.
        budget: tokens fed before giving up (the key search backtracks).

    Returns:
        The JSON text (the grammar accepted all of it and may end there), or None when no
        spelling found was accepted (the grammar rejects the value, or the search gave up).
    """
    walker = _GuidedWriter(grammar.matcher(), item_separator, key_separator, budget)
    try:
        text = walker.value(instance)
    except _OutOfBudget:
        return None
    return text if text is not None and walker.matcher.is_complete() else None


class _OutOfBudget(Exception):
    pass


class _GuidedWriter:
    def __init__(self, matcher: Any, sep: str, key_sep: str, budget: int):
        self.matcher = matcher
        self.sep = sep
        self.key_sep = key_sep
        self.budget = budget

    def _feed(self, text: str) -> bool:
        ids = self.matcher.retokenizer.encode(text) if text else []
        if ids is None:
            return False
        self.budget -= len(ids)
        if self.budget < 0:
            raise _OutOfBudget
        return self.matcher.accept_tokens(ids)

    def _undo_to(self, mark: int) -> None:
        self.matcher.rollback(self.matcher.num_accepted - mark)

    def value(self, value: Any) -> str | None:
        """Feed one value; its text, or None with the matcher unchanged."""
        mark = self.matcher.num_accepted
        if isinstance(value, dict):
            text = self._object(value)
        elif isinstance(value, list):
            text = self._array(value)
        else:
            text = next((s for s in _spellings(value) if self._feed(s)), None)
        if text is None:
            self._undo_to(mark)
        return text

    def _object(self, value: dict) -> str | None:
        if not self._feed("{"):
            return None
        members = self._members(value, list(value), True)
        return None if members is None else "{" + "".join(members) + "}"

    def _members(self, value: dict, left: list, first: bool) -> list[str] | None:
        """The remaining members and the closing brace, backtracking over key orders."""
        if not left:
            return [] if self._feed("}") else None
        for key in left:
            mark = self.matcher.num_accepted
            head = ("" if first else self.sep) + json.dumps(key, ensure_ascii=False) + self.key_sep
            if self._feed(head):
                body = self.value(value[key])
                if body is not None:
                    rest = self._members(value, [k for k in left if k != key], False)
                    if rest is not None:
                        return [head + body, *rest]
            self._undo_to(mark)
        return None

    def _array(self, value: list) -> str | None:
        if not self._feed("["):
            return None
        parts = []
        for i, item in enumerate(value):
            if i and not self._feed(self.sep):
                return None
            body = self.value(item)
            if body is None:
                return None
            parts.append(body)
        return "[" + self.sep.join(parts) + "]" if self._feed("]") else None


def _spellings(value: Any) -> list[str]:
    first = json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [first]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return [first, str(int(value))]
    if isinstance(value, int):
        return [first, f"{value}.0"]
    return [first]
