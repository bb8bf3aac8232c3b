"""radixlm's own JSON-schema-to-regex compiler.

The regex matches the *canonical serialization* of every instance the schema accepts:

- whitespace: none, except ``", "`` between items and ``": "`` after keys (``json.dumps``
  defaults), so ``json.dumps(value, ensure_ascii=False)`` of a valid value matches once its
  object keys are put in grammar order;
- object keys: declared ``properties`` in schema order, then pattern/additional properties;
- strings: characters written literally except the escapes ``json.dumps`` uses; free strings may
  use any valid JSON escape.

Free string content (a string constrained by nothing but ``minLength``/``maxLength``), any JSON
value (``{}``, ``true``, undeclared properties' values) and the keys of undeclared properties are
not spelled out in the regex: each is a *slot*, a two-control-character placeholder per distinct
kind and bound. The backend walks slot content itself, so they cost no DFA states, length bounds
of any size are exact, values nest to any depth, and an undeclared key can never repeat a
declared property's name. ``CompiledJson.expanded_regex()`` spells slots out (for tests).

What the regex cannot express is either *relaxed* (the regex accepts a superset: no valid
instance is ever rejected; each relaxation is listed in ``CompiledJson.relaxed``) or, with
``strict=True``, raised as :class:`GrammarError` naming the keyword. Unsatisfiable schemas,
invalid schemas and size-limit overruns always raise.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from radixlm.constrained.errors import GrammarError
from radixlm.constrained.json_formats import FORMAT_REGEXES, NON_STRING_FORMATS
from radixlm.constrained.regex_util import (
    FREE_JSON_CHAR,
    PatternTranslator,
    alternation,
    escape_literal,
    int_range_regex,
    repeat,
)

SLOT_BASE = 0x02
SLOT_RADIX = 30
MAX_SLOTS = SLOT_RADIX * SLOT_RADIX
ALL_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_OBJECT_KEYS = {"properties", "additionalProperties", "patternProperties", "required",
                "minProperties", "maxProperties", "propertyNames", "dependencies",
                "dependentRequired", "dependentSchemas", "unevaluatedProperties"}
_ARRAY_KEYS = {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "contains",
               "uniqueItems", "minContains", "maxContains", "unevaluatedItems"}
_STRING_KEYS = {"pattern", "minLength", "maxLength"}
_NUMBER_KEYS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
_RELAXED_KEYS = {
    "uniqueItems": "uniqueItems (duplicates not prevented)",
    "contains": "contains (not enforced)",
    "minContains": "minContains (not enforced)",
    "maxContains": "maxContains (not enforced)",
    "dependencies": "dependencies (not enforced)",
    "dependentRequired": "dependentRequired (not enforced)",
    "dependentSchemas": "dependentSchemas (not enforced)",
    "if": "if/then/else (not enforced)",
    "minProperties": "minProperties (not enforced)",
    "maxProperties": "maxProperties (not enforced)",
    "unevaluatedProperties": "unevaluatedProperties (not enforced)",
    "unevaluatedItems": "unevaluatedItems (not enforced)",
}


@dataclass(frozen=True)
class JsonSchemaOptions:
    """Knobs of the schema compiler (all bounds are documented relaxations or errors).

    Attributes:
        ref_depth: how many times a recursive ``$ref`` may re-enter itself; deeper nesting is
            not generated (an instance nested deeper is rejected).
        max_repeat: counted repetitions (``minItems``/``maxItems``, pattern quantifiers) above
            this are relaxed: the upper bound is dropped, the lower bound capped.
        max_regex_chars: a regex longer than this raises (the DFA would be too large).
        max_alternatives: cross products of ``anyOf``/``oneOf`` under ``allOf`` beyond this raise.
        additional_properties_default: JSON Schema allows undeclared properties unless
            ``additionalProperties`` says otherwise; False forbids them (stricter than the spec).
        strict: raise GrammarError instead of relaxing a keyword.
        item_separator, key_separator: the whitespace policy.
    """

    ref_depth: int = 3
    max_repeat: int = 16
    max_regex_chars: int = 2_000_000
    max_alternatives: int = 512
    additional_properties_default: bool = True
    strict: bool = False
    item_separator: str = ", "
    key_separator: str = ": "


@dataclass(frozen=True)
class Slot:
    """A part of the output walked outside the regex DFA.

    ``kind`` "string": free string content of ``min_length..max_length`` characters (any
    JSON escapes allowed); "key": free string content except the canonical spellings of
    ``excluded`` (an undeclared property may not reuse a declared name); "value": any JSON
    value, any depth, canonical whitespace.
    """

    kind: str = "string"
    min_length: int = 0
    max_length: int | None = None
    excluded: tuple[str, ...] = ()


STRING_SLOT = 0
VALUE_SLOT = 1


@dataclass(frozen=True)
class CompiledJson:
    """A compiled schema: the regex with slot placeholders and what was relaxed."""

    regex: str
    slots: tuple[Slot, ...]
    relaxed: tuple[str, ...] = field(default=())
    item_separator: str = ", "
    key_separator: str = ": "

    @staticmethod
    def slot_char(index: int) -> str:
        """The two placeholder characters of slot ``index`` in :attr:`regex`."""
        return chr(SLOT_BASE + index // SLOT_RADIX) + chr(SLOT_BASE + index % SLOT_RADIX)

    def expanded_regex(self, value_depth: int = 3) -> str:
        """The regex with every slot spelled out, for Python's ``re`` (tests).

        Args:
            value_depth: container nesting spelled out for value slots (the grammar itself
                accepts any depth).
        """
        out = self.regex
        for index, slot in enumerate(self.slots):
            if slot.kind == "value":
                spelled = any_value_regex(value_depth, escape_literal(self.item_separator),
                                          escape_literal(self.key_separator))
            else:
                spelled = repeat(FREE_JSON_CHAR, slot.min_length, slot.max_length)
            out = out.replace(self.slot_char(index), spelled)
        return out


def any_value_regex(depth: int, item_sep: str, key_sep: str) -> str:
    """Any JSON value (any string spelling) with containers nested at most ``depth`` deep."""
    string = '"' + repeat(FREE_JSON_CHAR, 0, None) + '"'
    scalars = [string, NUMBER_REGEX, "true", "false", "null"]
    if depth > 0:
        inner = any_value_regex(depth - 1, item_sep, key_sep)
        scalars.append(rf"\[(?:{inner}(?:{item_sep}{inner})*)?\]")
        member = string + key_sep + inner
        scalars.append(rf"\{{(?:{member}(?:{item_sep}{member})*)?\}}")
    return alternation(scalars) or ""


class _Never(Exception):
    """Internal: the (sub)schema accepts no value."""


def compile_json_schema(schema: Any, options: JsonSchemaOptions | None = None) -> CompiledJson:
    """Compile a JSON schema (dict, bool or JSON text) to a :class:`CompiledJson`.

    Raises:
        GrammarError: invalid or unsatisfiable schema, unsupported feature (strict mode), or
            a size limit.
    """
    root = _load(schema)
    compiler = SchemaCompiler(root, options or JsonSchemaOptions())
    return compiler.compile()


def compile_json_any(options: JsonSchemaOptions | None = None, object_only: bool = True
                     ) -> CompiledJson:
    """Any JSON object (``json_object`` mode), or any JSON value with ``object_only=False``."""
    schema = {"type": "object"} if object_only else True
    return compile_json_schema(schema, options)


def _load(schema: Any) -> Any:
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise GrammarError(f"JSON schema is not valid JSON: {exc}", feature="json") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("a JSON schema must be an object or a boolean", feature="schema")
    return schema


class SchemaCompiler:
    """Turns one root schema into a regex; also exposes the normalisation it uses.

    Args:
        root: the root schema (local ``$ref`` targets resolve against it).
        options: see :class:`JsonSchemaOptions`.
    """

    def __init__(self, root: Any, options: JsonSchemaOptions):
        self.root = root
        self.options = options
        self.slots: dict[Slot, int] = {Slot("string"): STRING_SLOT, Slot("value"): VALUE_SLOT}
        self.relaxed: list[str] = []
        self._item_sep = escape_literal(options.item_separator)
        self._key_sep = escape_literal(options.key_separator)
        self._ecma = PatternTranslator(json_string=True, max_repeat=options.max_repeat)

    def compile(self) -> CompiledJson:
        """The regex for the root schema."""
        try:
            regex = self.value(self.root, ())
        except _Never:
            raise GrammarError("the schema accepts no value", feature="unsatisfiable") from None
        except RecursionError:
            raise GrammarError("schema nesting too deep", feature="depth") from None
        self.relaxed.extend(self._ecma.relaxed)
        slots = tuple(sorted(self.slots, key=self.slots.__getitem__))
        return CompiledJson(regex, slots, tuple(dict.fromkeys(self.relaxed)),
                            self.options.item_separator, self.options.key_separator)

    # ---- bookkeeping ----

    def relax(self, what: str, feature: str) -> None:
        """Record a relaxation, or raise in strict mode."""
        if self.options.strict:
            raise GrammarError(f"unsupported JSON schema feature '{feature}': {what}",
                               feature=feature)
        self.relaxed.append(what)

    def _check_size(self, regex: str) -> str:
        if len(regex) > self.options.max_regex_chars:
            raise GrammarError(
                f"schema too large: regex over {self.options.max_regex_chars} characters",
                feature="size")
        return regex

    def slot(self, low: int, high: int | None) -> str:
        """The placeholder for free string content of ``low..high`` characters."""
        return self._placeholder(Slot("string", low, high), Slot("string"))

    def key_slot(self, declared: list[str]) -> str:
        """The placeholder for an undeclared property's key (not one of ``declared``)."""
        return self._placeholder(Slot("key", excluded=tuple(sorted(set(declared)))),
                                 Slot("string"))

    def _placeholder(self, slot: Slot, fallback: Slot) -> str:
        if slot not in self.slots:
            if len(self.slots) >= MAX_SLOTS:
                self.relax(f"{slot.kind} slot bounds (over {MAX_SLOTS} distinct slots)",
                           "minLength")
                slot = fallback
            else:
                self.slots[slot] = len(self.slots)
        return CompiledJson.slot_char(self.slots[slot])

    # ---- normalisation ----

    def resolve(self, schema: Any, stack: tuple) -> tuple[Any, tuple]:
        """``schema`` with ``$ref`` followed and ``allOf`` merged in, plus the ref stack.

        Returns False for a subschema that accepts nothing (including a recursion past the
        bound), True for one that accepts anything.
        """
        if isinstance(schema, bool):
            return schema, stack
        if not isinstance(schema, dict):
            raise GrammarError(f"invalid subschema {str(schema)[:80]!r}", feature="schema")
        schema = self._canonical(schema)
        if "$ref" in schema:
            return self._resolve_ref(schema, stack)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list):
                raise GrammarError("allOf must be a list", feature="allOf")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            merged: Any = rest
            for part in parts:
                resolved, stack = self.resolve(part, stack)
                merged = merge_schemas(merged, resolved)
            return self.resolve(merged, stack) if isinstance(merged, dict) else (merged, stack)
        return schema, stack

    def _resolve_ref(self, schema: dict, stack: tuple) -> tuple[Any, tuple]:
        ref = schema["$ref"]
        siblings = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
        if stack.count(ref) >= self.options.ref_depth:
            return False, stack
        target = self.lookup(ref)
        if target is None:
            self.relax(f"$ref {ref!r} (not a local reference: any value)", "$ref")
            target = True
        if siblings:
            return self.resolve({"allOf": [target, siblings]}, stack + (ref,))
        return self.resolve(target, stack + (ref,))

    def lookup(self, ref: Any) -> Any:
        """The subschema a local ``$ref`` names, or None if it is not local."""
        if not isinstance(ref, str):
            raise GrammarError(f"invalid $ref {ref!r}", feature="$ref")
        base, _, fragment = ref.partition("#")
        root_id = self.root.get("$id", self.root.get("id", "")) if isinstance(self.root,
                                                                              dict) else ""
        if base and base != str(root_id).partition("#")[0]:
            return None
        if not fragment:
            return self.root
        if not fragment.startswith("/"):
            return self._find_anchor(self.root, fragment)
        node = self.root
        for raw in fragment[1:].split("/"):
            key = urllib.parse.unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            elif isinstance(node, dict) and key in node:
                node = node[key]
            else:
                raise GrammarError(f"$ref {ref!r} points nowhere", feature="$ref")
        return node

    def _find_anchor(self, node: Any, name: str) -> Any:
        if isinstance(node, dict):
            if node.get("$anchor") == name or node.get("$id") == "#" + name or node.get(
                    "id") == "#" + name:
                return node
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            return None
        for child in children:
            found = self._find_anchor(child, name)
            if found is not None:
                return found
        raise GrammarError(f"$ref anchor #{name} not found", feature="$ref") if node is \
            self.root else None

    def _canonical(self, schema: dict) -> dict:
        """One spelling per concept (draft 4..2020), so merging and compiling see fewer forms."""
        out = dict(schema)
        if isinstance(out.get("items"), list):
            out["prefixItems"] = out.pop("items")
            if "additionalItems" in out:
                out["items"] = out.pop("additionalItems")
        else:
            out.pop("additionalItems", None)
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(out.get(bound), bool):
                if out.pop(bound) and plain in out:
                    out[bound] = out.pop(plain)
        if "const" in out:
            const = out.pop("const")
            out["enum"] = [v for v in out.get("enum", [const]) if _json_equal(v, const)]
        if "type" in out:
            out["type"] = _type_list(out["type"])
            if out.get("nullable") is True and "null" not in out["type"]:
                out["type"] = out["type"] + ["null"]
        for key in ("anyOf", "oneOf"):
            if key in out:
                alts = out.pop(key)
                if not isinstance(alts, list) or not alts:
                    raise GrammarError(f"{key} must be a non-empty list", feature=key)
                out["_alts"] = list(out.get("_alts", [])) + [alts]
        if "not" in out:
            out["_nots"] = list(out.get("_nots", [])) + [out.pop("not")]
        return out

    # ---- values ----

    def value(self, schema: Any, stack: tuple) -> str:
        """Regex for the serialization of any instance of ``schema`` (raises _Never)."""
        schema, stack = self.resolve(schema, stack)
        if schema is True:
            return self.any_value()
        if schema is False:
            raise _Never
        if "_alts" in schema:
            return self._alternatives(schema, stack)
        schema = self._apply_nots(schema, stack)
        if schema is True:
            return self.any_value()
        if _unconstrained(schema):
            return self.any_value()
        self._note_relaxed_keys(schema)
        if "enum" in schema:
            return self._enum(schema)
        parts = []
        for kind in self.types_of(schema):
            try:
                parts.append(self._typed(kind, schema, stack))
            except _Never:
                continue
        regex = alternation(parts)
        if regex is None:
            raise _Never
        return self._check_size(regex)

    def _alternatives(self, schema: dict, stack: tuple) -> str:
        base = {k: v for k, v in schema.items() if k != "_alts"}
        lists = schema["_alts"]
        if math.prod(len(alts) for alts in lists) > self.options.max_alternatives:
            raise GrammarError("too many anyOf/oneOf combinations", feature="anyOf")
        parts = []
        for combo in itertools.product(*lists):
            merged: Any = base
            inner = stack
            for alt in combo:
                resolved, deeper = self.resolve(alt, stack)
                inner = inner + deeper[len(stack):]  # refs followed count toward the bound
                merged = merge_schemas(merged, resolved)
            try:
                parts.append(self.value(merged, inner))
            except _Never:
                continue
        regex = alternation(parts)
        if regex is None:
            raise _Never
        return self._check_size(regex)

    def _apply_nots(self, schema: dict, stack: tuple) -> Any:
        nots = schema.get("_nots")
        if not nots:
            return schema
        out = {k: v for k, v in schema.items() if k != "_nots"}
        for negated in nots:
            negated, _ = self.resolve(negated, stack)
            out = _negate_into(out, negated, self)
            if out is False:
                raise _Never
        return out

    def _note_relaxed_keys(self, schema: dict) -> None:
        for key, what in _RELAXED_KEYS.items():
            if key in schema and not (key == "uniqueItems" and schema[key] is False):
                self.relax(what, key)

    def types_of(self, schema: dict) -> list[str]:
        """The JSON types ``schema`` admits, in a fixed order (integer before number)."""
        if "type" in schema:
            declared = set(schema["type"])
            if "number" in declared:
                declared.discard("integer")
        else:
            declared = _inferred_types(schema)
        return [t for t in ALL_TYPES if t in declared]

    def _typed(self, kind: str, schema: dict, stack: tuple) -> str:
        if kind == "null":
            return "null"
        if kind == "boolean":
            return "(?:true|false)"
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "string":
            return self._string(schema)
        if kind == "array":
            return self._array(schema, stack)
        return self._object(schema, stack)

    def _enum(self, schema: dict) -> str:
        values = schema["enum"]
        if not isinstance(values, list):
            raise GrammarError("enum must be a list", feature="enum")
        kept = [v for v in values if _enum_value_fits(v, schema)]
        regex = alternation(escape_literal(self.dumps(v)) for v in kept)
        if regex is None:
            raise _Never
        return regex

    def dumps(self, value: Any) -> str:
        """The canonical serialization of a literal value."""
        return json.dumps(value, ensure_ascii=False, separators=(self.options.item_separator,
                                                                  self.options.key_separator))

    # ---- any value ----

    def any_value(self) -> str:
        """Any JSON value: the value slot (walked outside the DFA, any depth)."""
        return CompiledJson.slot_char(VALUE_SLOT)

    # ---- scalars ----

    def _integer(self, schema: dict) -> str:
        low, high = _integer_bounds(schema)
        regex = int_range_regex(low, high)
        if regex is None:
            raise _Never
        step = schema.get("multipleOf")
        if step is not None and not (isinstance(step, (int, float)) and float(step).is_integer()
                                     and int(step) == 1):
            regex = self._integer_multiple(regex, step, low, high)
        return regex

    def _integer_multiple(self, regex: str, step: Any, low: int | None, high: int | None
                          ) -> str:
        if not isinstance(step, (int, float)) or step <= 0:
            raise GrammarError(f"invalid multipleOf {step!r}", feature="multipleOf")
        if not float(step).is_integer():
            self.relax(f"multipleOf {step} on an integer", "multipleOf")
            return regex
        step = int(step)
        if low is not None and high is not None and (high - low) // step <= 256:
            first = -(-low // step) * step
            values = range(first, high + 1, step)
            return alternation(str(v) for v in values) or _raise_never()
        zeros = len(str(step)) - len(str(step).rstrip("0"))
        if step == 10**zeros:
            return rf"(?:0|-?[1-9][0-9]*0{{{zeros}}})" if zeros else regex
        self.relax(f"multipleOf {step} on an unbounded integer", "multipleOf")
        return regex

    def _number(self, schema: dict) -> str:
        low, low_open, high, high_open = _number_bounds(schema)
        if low is not None and high is not None and (low > high or (
                low == high and (low_open or high_open))):
            raise _Never
        if schema.get("multipleOf") is not None:
            self.relax(f"multipleOf {schema['multipleOf']} on a number", "multipleOf")
        sign = _sign_constraint(low, low_open, high, high_open)
        exact = sign is not None and (low is None or low == 0) and (high is None or high == 0)
        if not exact and (low is not None or high is not None):
            self.relax("minimum/maximum on a number (only the sign is enforced)", "minimum")
        return sign if sign is not None else NUMBER_REGEX

    # ---- strings ----

    def _string(self, schema: dict) -> str:
        low = _nonneg_int(schema.get("minLength", 0), "minLength")
        high = schema.get("maxLength")
        high = None if high is None else _nonneg_int(high, "maxLength")
        if high is not None and high < low:
            raise _Never
        pattern = schema.get("pattern")
        fmt = schema.get("format")
        if pattern is not None:
            return '"' + self._pattern(pattern, low, high) + '"'
        if isinstance(fmt, str) and fmt not in NON_STRING_FORMATS:
            content = FORMAT_REGEXES.get(fmt)
            if content is not None:
                if low or high is not None:
                    self.relax("minLength/maxLength together with a format", "format")
                return '"' + content + '"'
            self.relax(f"format {fmt!r} (unknown: any string)", "format")
        return '"' + self.slot(low, high) + '"'

    def _pattern(self, pattern: Any, low: int, high: int | None) -> str:
        if not isinstance(pattern, str):
            raise GrammarError(f"pattern must be a string, got {pattern!r}", feature="pattern")
        if low or high is not None:
            self.relax("minLength/maxLength together with a pattern", "pattern")
        try:
            content = self._ecma.translate_search(pattern)
        except GrammarError as exc:
            self.relax(f"pattern {pattern!r} ({exc}: any string)", "pattern")
            return self.slot(low, high)
        if content is None:
            raise _Never
        return content

    # ---- arrays ----

    def _array(self, schema: dict, stack: tuple) -> str:
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", True)
        low = _nonneg_int(schema.get("minItems", 0), "minItems")
        high = schema.get("maxItems")
        high = None if high is None else _nonneg_int(high, "maxItems")
        elements = []
        for sub in prefix:
            try:
                elements.append(self.value(sub, stack))
            except _Never:
                high = len(elements) if high is None else min(high, len(elements))
                break
        try:
            rest = self.value(items, stack)
        except _Never:
            rest = None
            high = len(elements) if high is None else min(high, len(elements))
        if high is not None and high < low:
            raise _Never
        low, high = self._bounded_counts(low, high, len(elements), "items")
        body = _sequence_regex(elements, rest, low, high, self._item_sep)
        if body is None:
            raise _Never
        return r"\[" + body + r"\]"

    def _bounded_counts(self, low: int, high: int | None, fixed: int, what: str
                        ) -> tuple[int, int | None]:
        cap = self.options.max_repeat
        if high is not None and high - fixed > cap:
            self.relax(f"max{what.title()} {high} (above {cap}: not enforced)", "maxItems")
            high = None
        if low - fixed > cap:
            self.relax(f"min{what.title()} {low} (above {cap}: capped)", "minItems")
            low = fixed + cap
        return low, high

    # ---- objects ----

    def _object(self, schema: dict, stack: tuple) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise GrammarError("properties must be an object", feature="properties")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise GrammarError("required must be a list", feature="required")
        required = list(dict.fromkeys(required))
        members = []
        for name in list(props) + [r for r in required if r not in props]:
            member = self._member(name, schema, stack, name in required)
            if member is not None:
                members.append(member)
        extra = self._extra_member(schema, stack)
        body = _members_regex(members, extra, self._item_sep)
        if body is None:
            raise _Never
        return r"\{" + body + r"\}"

    def _member(self, name: str, schema: dict, stack: tuple, required: bool
                ) -> tuple[str, bool] | None:
        sub = property_schema(schema, name, self.options)
        try:
            value = self.value(sub, stack)
        except _Never:
            if required:
                raise
            return None
        key = escape_literal(self.dumps(name)) + self._key_sep
        return key + value, required

    def _extra_member(self, schema: dict, stack: tuple) -> str | None:
        parts = []
        for pattern, sub in (schema.get("patternProperties") or {}).items():
            try:
                key = '"' + self._pattern(pattern, 0, None) + '"'
                parts.append(key + self._key_sep + self.value(sub, stack))
            except _Never:
                continue
        additional = schema.get("additionalProperties", self.options.additional_properties_default)
        if additional is not False:
            try:
                value = self.value(additional, stack)
                parts.append(self._property_name(schema, stack) + self._key_sep + value)
            except _Never:
                pass
        return alternation(parts)

    def _property_name(self, schema: dict, stack: tuple) -> str:
        declared = list(schema.get("properties") or {}) + list(schema.get("required") or [])
        names = schema.get("propertyNames")
        resolved = True if names is None else self.resolve(names, stack)[0]
        if resolved is False:
            raise _Never
        if resolved is True or _unconstrained(resolved):
            return '"' + self.key_slot(declared) + '"'
        return self.value(merge_schemas({"type": ["string"]}, resolved), stack)


# ---- helpers shared with the serializer ----

_ANNOTATIONS = {"description", "title", "default", "examples", "example", "$comment",
                "$schema", "$id", "id", "definitions", "$defs", "readOnly", "writeOnly",
                "deprecated", "markdownDescription", "$anchor"}
NUMBER_REGEX = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_POSITIVE = r"(?:(?:0\.[0-9]*[1-9][0-9]*|[1-9][0-9]*(?:\.[0-9]+)?)(?:[eE][+-]?[0-9]+)?)"
_ZERO = r"(?:0(?:\.0+)?(?:[eE][+-]?[0-9]+)?)"


def property_schema(schema: dict, name: str, options: JsonSchemaOptions) -> Any:
    """The schema a property named ``name`` must satisfy inside object schema ``schema``."""
    props = schema.get("properties") or {}
    if name in props:
        return props[name]
    matched = [sub for pattern, sub in (schema.get("patternProperties") or {}).items()
               if _search(pattern, name)]
    if matched:
        return matched[0] if len(matched) == 1 else {"allOf": matched}
    return schema.get("additionalProperties", options.additional_properties_default)


def _search(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return True


def _unconstrained(schema: dict) -> bool:
    """True for a schema that admits every JSON value (only annotations, or every type)."""
    keys = set(schema) - _ANNOTATIONS
    if keys == {"type"}:
        return set(schema["type"]) >= {"object", "array", "string", "number", "boolean", "null"}
    return not keys


def _raise_never():
    raise _Never


def _type_list(value: Any) -> list[str]:
    names = value if isinstance(value, list) else [value]
    for name in names:
        if name not in ALL_TYPES:
            raise GrammarError(f"unknown type {name!r}", feature="type")
    return list(dict.fromkeys(names))


def _inferred_types(schema: dict) -> set[str]:
    keys = set(schema)
    found = set()
    if keys & _OBJECT_KEYS:
        found.add("object")
    if keys & _ARRAY_KEYS:
        found.add("array")
    fmt = schema.get("format")
    if keys & _STRING_KEYS or (isinstance(fmt, str) and fmt not in NON_STRING_FORMATS):
        found.add("string")
    if keys & _NUMBER_KEYS:
        found.add("number")
    return found or set(ALL_TYPES)


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1, at any depth."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, dict)) or isinstance(b, (list, dict)):
        return False
    return a == b


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _enum_value_fits(value: Any, schema: dict) -> bool:
    """Whether an enum value survives the other keywords of its schema (cheap checks only)."""
    if "type" in schema:
        kind = _json_type(value)
        allowed = set(schema["type"])
        if not (kind in allowed or (kind == "integer" and "number" in allowed)):
            return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength",
                                                                               math.inf):
            return False
    return True


def _nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise GrammarError(f"{name} must be a non-negative integer, got {value!r}", feature=name)
    return value


def _numeric(value: Any, name: str) -> float | int | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise GrammarError(f"{name} must be a number, got {value!r}", feature=name)
    return value


def _integer_bounds(schema: dict) -> tuple[int | None, int | None]:
    low, low_open, high, high_open = _number_bounds(schema)
    if low is not None:
        low = math.floor(low) + 1 if low_open and float(low).is_integer() else math.ceil(low)
    if high is not None:
        high = math.ceil(high) - 1 if high_open and float(high).is_integer() else math.floor(
            high)
    return low, high


def _number_bounds(schema: dict) -> tuple[Any, bool, Any, bool]:
    low, low_open = _numeric(schema.get("minimum"), "minimum"), False
    xmin = _numeric(schema.get("exclusiveMinimum"), "exclusiveMinimum")
    if xmin is not None and (low is None or xmin >= low):
        low, low_open = xmin, True
    high, high_open = _numeric(schema.get("maximum"), "maximum"), False
    xmax = _numeric(schema.get("exclusiveMaximum"), "exclusiveMaximum")
    if xmax is not None and (high is None or xmax <= high):
        high, high_open = xmax, True
    return low, low_open, high, high_open


def _sign_constraint(low, low_open, high, high_open) -> str | None:
    """A number regex enforcing the sign implied by the bounds, or None if there is none."""
    nonneg = low is not None and (low > 0 or (low == 0 and not low_open))
    positive = low is not None and (low > 0 or (low == 0 and low_open))
    nonpos = high is not None and (high < 0 or (high == 0 and not high_open))
    negative = high is not None and (high < 0 or (high == 0 and high_open))
    if positive:
        return _POSITIVE
    if negative:
        return "-" + _POSITIVE
    if nonneg and nonpos:
        return "-?" + _ZERO
    if nonneg:
        return f"(?:{_ZERO}|{_POSITIVE})"
    if nonpos:
        return f"(?:-?{_ZERO}|-{_POSITIVE})"
    return None


def _sequence_regex(elements: list[str], rest: str | None, low: int, high: int | None,
                    sep: str) -> str | None:
    """Array body: positional ``elements`` then ``rest`` repeated, ``low..high`` items in all.

    ``rest`` None means no item past the positional ones. Returns None if no length fits.
    """
    fixed = len(elements)
    top = high if rest is not None else (fixed if high is None else min(high, fixed))
    if top is not None and top < low:
        return None
    positional = fixed if top is None else min(fixed, top)
    tail_low = max(low - fixed, 0)
    tail_high = None if top is None else max(top - fixed, 0)
    has_tail = rest is not None and (tail_high is None or tail_high > 0)
    if positional == 0:
        if not has_tail:
            return ""
        upper = None if tail_high is None else tail_high - 1
        first = rest + repeat(sep + rest, max(tail_low - 1, 0), upper)
        return first if tail_low > 0 else "(?:" + first + ")?"
    out = repeat(sep + rest, tail_low, tail_high) if has_tail else ""
    for i in reversed(range(positional)):
        head = (sep if i else "") + elements[i] + out
        out = head if i < low else "(?:" + head + ")?"
    return out


def _members_regex(members: list[tuple[str, bool]], extra: str | None, sep: str) -> str | None:
    """Object body: members in order (optional ones may be missing), then extra members.

    Built left to right so the regex stays linear in the number of properties: ``chain`` is
    "a non-empty selection of the members so far that includes every required one", and
    ``empty_ok`` says whether the empty selection is valid too. A leading run of optional
    members is taken in blocks, which bounds the group nesting (regex parsers limit it).
    """
    chain: str | None = None
    empty_ok = True
    i = 0
    while i < len(members):
        if empty_ok and not members[i][1]:
            block = []
            while i < len(members) and not members[i][1] and len(block) < _BLOCK:
                block.append(members[i][0])
                i += 1
            tail = "".join("(?:" + sep + regex + ")?" for regex in block)
            chain = alternation([None if chain is None else chain + tail,
                                 _nonempty_selection(block, sep)])
            continue
        regex, required = members[i]
        i += 1
        options = []
        if chain is not None:
            options.append(chain + sep + regex if required else chain + "(?:" + sep + regex + ")?")
        if empty_ok:
            options.append(regex)
        chain = alternation(options)
        empty_ok = empty_ok and not required
    extras = "" if extra is None else "(?:" + sep + extra + ")*"
    if not empty_ok:
        return chain + extras if chain is not None else None
    starts = [chain + extras if chain is not None else None,
              extra + extras if extra is not None else None]
    body = alternation(starts)
    return "" if body is None else "(?:" + body + ")?"


_BLOCK = 16


def _nonempty_selection(block: list[str], sep: str) -> str:
    """A non-empty, in-order selection of the (optional) member regexes in ``block``."""
    chain: str | None = None
    for regex in block:
        chain = alternation([None if chain is None else chain + "(?:" + sep + regex + ")?",
                             regex])
    return chain or ""


def _negate_into(schema: dict, negated: Any, compiler: SchemaCompiler) -> Any:
    """``schema`` AND NOT ``negated`` for the forms a regex can express; else relaxed."""
    if negated is True:
        return False
    if negated is False:
        return schema
    keys = set(negated) - _ANNOTATIONS
    if not keys:
        return False
    if keys == {"type"}:
        banned = set(negated["type"])
        if "number" in banned:
            banned.add("integer")
        current = set(schema.get("type", ALL_TYPES)) if "type" in schema else set(
            _inferred_types(schema))
        if "number" in current and "integer" not in banned and "number" in banned:
            current.add("integer")
        left = [t for t in ALL_TYPES if t in current and t not in banned]
        return {**schema, "type": left} if left else False
    if keys == {"required"} and len(negated["required"]) == 1:
        name = negated["required"][0]
        props = dict(schema.get("properties", {}))
        props[name] = False
        required = [r for r in schema.get("required", []) if r != name]
        if name in schema.get("required", []):
            return False
        return {**schema, "properties": props, "required": required}
    if keys == {"enum"} and "enum" in schema:
        kept = [v for v in schema["enum"] if not any(_json_equal(v, n) for n in negated["enum"])]
        return {**schema, "enum": kept} if kept else False
    compiler.relax(f"not {json.dumps(negated)[:60]} (not enforced)", "not")
    return schema


def merge_schemas(a: Any, b: Any) -> Any:
    """The conjunction of two resolved schemas (as close as one schema can express it).

    Conflicting keywords that a single schema cannot combine (two different patterns) keep the
    first one: the result is then a superset, never a subset.
    """
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        else:
            out[key] = _merge_key(key, out[key], value, a, b)
    _merge_property_sets(out, a, b)
    if "type" in out and not out["type"]:
        return False
    return out


def _merge_key(key: str, mine: Any, theirs: Any, a: dict, b: dict) -> Any:
    if key == "type":
        left, right = set(mine), set(theirs)
        both = left & right
        if "number" in left and "integer" in right or "integer" in left and "number" in right:
            both.add("integer")
        return [t for t in ALL_TYPES if t in both]
    if key == "required":
        return list(dict.fromkeys(list(mine) + list(theirs)))
    if key == "enum":
        return [v for v in mine if any(_json_equal(v, w) for w in theirs)]
    if key in ("_alts", "_nots"):
        return list(mine) + list(theirs)
    if key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
        return max(mine, theirs)
    if key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
        return min(mine, theirs)
    if key in ("items", "additionalProperties", "propertyNames", "contains"):
        return {"allOf": [mine, theirs]}
    if key == "prefixItems":
        longest = max(len(mine), len(theirs))
        return [_conj(mine, theirs, i, a, b) for i in range(longest)]
    if key == "patternProperties":
        merged = dict(mine)
        for pattern, sub in theirs.items():
            merged[pattern] = {"allOf": [merged[pattern], sub]} if pattern in merged else sub
        return merged
    return mine


def _conj(mine: list, theirs: list, i: int, a: dict, b: dict) -> Any:
    left = mine[i] if i < len(mine) else a.get("items", True)
    right = theirs[i] if i < len(theirs) else b.get("items", True)
    return {"allOf": [left, right]}


def _merge_property_sets(out: dict, a: dict, b: dict) -> None:
    """Properties declared on one side must also satisfy the other side's rules for them."""
    if "properties" not in a and "properties" not in b:
        return
    names = list(dict.fromkeys(list(a.get("properties", {})) + list(b.get("properties", {}))))
    merged = {}
    for name in names:
        parts = [_side_rule(side, name) for side in (a, b)]
        parts = [p for p in parts if p is not True]
        merged[name] = True if not parts else parts[0] if len(parts) == 1 else {"allOf": parts}
    out["properties"] = merged


def _side_rule(side: dict, name: str) -> Any:
    if name in side.get("properties", {}):
        return side["properties"][name]
    if not (set(side) & {"properties", "additionalProperties", "patternProperties"}):
        return True
    matched = [sub for pattern, sub in (side.get("patternProperties") or {}).items()
               if _search(pattern, name)]
    if matched:
        return matched[0] if len(matched) == 1 else {"allOf": matched}
    return side.get("additionalProperties", True)
