"""The JSON-schema-to-regex compiler, feature by feature.

Each case gives valid instances (jsonschema must accept them, the regex must fullmatch their
canonical serialization) and invalid ones (jsonschema must reject them; the regex must reject
them too when the feature is enforced, i.e. not listed in ``relaxed``).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from radixlm.constrained import GrammarError, JsonSchemaOptions, canonical_json
from radixlm.constrained.json_schema import compile_json_schema

DRAFT7 = "http://json-schema.org/draft-07/schema#"

CASES = {
    "required_and_optional": (
        {
            "type": "object",
            "properties": {
                "a": {"type": "integer"},
                "b": {"type": "boolean"},
                "c": {"type": "null"},
            },
            "required": ["b"],
            "additionalProperties": False,
        },
        [
            {"b": True},
            {"a": 1, "b": False},
            {"b": True, "c": None},
            {"a": -3, "b": True, "c": None},
        ],
        [{}, {"a": 1}, {"b": 1}, {"b": True, "d": 1}],
    ),
    "all_optional": (
        {
            "type": "object",
            "properties": {"x": {"type": "string"}, "y": {"type": "number"}},
            "additionalProperties": False,
        },
        [{}, {"x": "a"}, {"y": 1.5}, {"x": "", "y": -2}],
        [{"z": 1}, {"x": 1}],
    ),
    "additional_properties_default_allows_extras": (
        {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
        [{"id": 1}, {"id": 1, "note": "x", "deep": {"a": [1, {"b": None}]}}],
        [{"note": "x"}, {"id": "1"}],
    ),
    "additional_properties_schema": (
        {
            "type": "object",
            "properties": {"id": {"type": "integer"}},
            "additionalProperties": {"type": "string"},
        },
        [{}, {"id": 1, "k": "v"}, {"k": "v", "l": "w"}],
        [{"k": 1}],
    ),
    "pattern_properties": (
        {
            "type": "object",
            "patternProperties": {"^x-": {"type": "integer"}},
            "additionalProperties": False,
        },
        [{}, {"x-a": 1, "x-b": 2}],
        [{"y": 1}, {"x-a": "s"}],
    ),
    "all_of_merged": (
        {
            "allOf": [
                {
                    "type": "object",
                    "properties": {"a": {"type": "integer", "minimum": 0}},
                    "required": ["a"],
                },
                {
                    "properties": {"a": {"maximum": 9}, "b": {"const": "k"}},
                    "required": ["b"],
                    "additionalProperties": False,
                },
            ]
        },
        [{"a": 0, "b": "k"}, {"a": 9, "b": "k"}],
        [
            {"a": 10, "b": "k"},
            {"a": 1},
            {"b": "k"},
            {"a": -1, "b": "k"},
            {"a": 1, "b": "k", "c": 1},
        ],
    ),
    "any_of": (
        {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer", "minimum": 5}]},
        ["", "ab", 5, 100],
        ["abc", 4, None],
    ),
    "one_of_disjoint": (
        {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "a"}},
                    "required": ["kind"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"kind": {"const": "b"}, "n": {"type": "integer"}},
                    "required": ["kind", "n"],
                    "additionalProperties": False,
                },
            ]
        },
        [{"kind": "a"}, {"kind": "b", "n": 3}],
        [{"kind": "a", "n": 3}, {"kind": "b"}, {"kind": "c"}],
    ),
    "enum_and_const": (
        {
            "type": "object",
            "properties": {"e": {"enum": ["x", 2, None, [1, "y"]]}, "c": {"const": {"k": True}}},
            "required": ["e", "c"],
            "additionalProperties": False,
        },
        [
            {"e": "x", "c": {"k": True}},
            {"e": [1, "y"], "c": {"k": True}},
            {"e": None, "c": {"k": True}},
        ],
        [{"e": "z", "c": {"k": True}}, {"e": 2, "c": {"k": False}}],
    ),
    "local_ref_and_recursion_bound": (
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["v"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
        [{"v": 1}, {"v": 1, "kids": []}, {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}],
        [{"kids": []}, {"v": 1, "kids": [{}]}],
    ),
    "integer_range": (
        {"type": "integer", "minimum": -17, "exclusiveMaximum": 250},
        [-17, -1, 0, 9, 10, 99, 100, 249],
        [-18, 250, 1000, 1.5],
    ),
    "integer_draft4_exclusive": (
        {
            "$schema": "http://json-schema.org/draft-04/schema#",
            "type": "integer",
            "minimum": 0,
            "exclusiveMinimum": True,
            "maximum": 3,
        },
        [1, 2, 3],
        [0, 4],
    ),
    "number_sign_bounds": (
        {"type": "number", "exclusiveMinimum": 0},
        [0.5, 1, 1e-05, 12.25],
        [0, -1, -0.5, 0.0],
    ),
    "string_formats": (
        {
            "type": "object",
            "properties": {
                "d": {"type": "string", "format": "date"},
                "dt": {"type": "string", "format": "date-time"},
                "t": {"type": "string", "format": "time"},
                "e": {"type": "string", "format": "email"},
                "u": {"type": "string", "format": "uuid"},
                "uri": {"type": "string", "format": "uri"},
                "ip": {"type": "string", "format": "ipv4"},
                "ip6": {"type": "string", "format": "ipv6"},
            },
            "additionalProperties": False,
        },
        [
            {
                "d": "2024-02-29",
                "dt": "2024-02-29T23:59:59.5+05:30",
                "t": "10:00:00",
                "e": "jo.doe@example.com",
                "u": "123e4567-e89b-12d3-a456-426614174000",
                "uri": "https://example.com/a?b=c#d",
                "ip": "192.168.0.1",
                "ip6": "2001:db8::1",
            }
        ],
        [
            {"d": "2024-13-01"},
            {"dt": "2024-01-01"},
            {"e": "nope"},
            {"u": "123"},
            {"ip": "256.1.1.1"},
            {"t": "10:00"},
        ],
    ),
    "string_lengths": (
        {"type": "string", "minLength": 2, "maxLength": 4},
        ["ab", "abcd", 'é"\\n'],
        ["a", "abcde"],
    ),
    "string_pattern": (
        {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
        ["AB-123"],
        ["ab-123", "AB-12", "AB-1234"],
    ),
    "pattern_unanchored": (
        {"type": "string", "pattern": 'o"k'},
        ['o"k', 'xxo"kyy'],
        ["ok", "o'k"],
    ),
    "array_items_and_bounds": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        [[1], [1, 2, 3]],
        [[], [1, 2, 3, 4], ["a"]],
    ),
    "prefix_items_closed": (
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        [[], ["a"], ["a", 1]],
        [["a", 1, 2], [1]],
    ),
    "draft4_tuple_items": (
        {
            "$schema": DRAFT7,
            "type": "array",
            "items": [{"type": "boolean"}],
            "additionalItems": {"type": "null"},
        },
        [[], [True], [False, None, None]],
        [[None], [True, 1]],
    ),
    "type_list": (
        {
            "type": "object",
            "properties": {
                "a": {"type": ["string", "null"]},
                "b": {"type": ["integer", "boolean"]},
            },
            "additionalProperties": False,
        },
        [{"a": None}, {"a": "x", "b": 3}, {"b": True}],
        [{"b": "x"}, {"b": None}, {"a": 1}],
    ),
    "boolean_schemas": (
        {
            "type": "object",
            "properties": {"any": True, "never": False},
            "additionalProperties": False,
        },
        [{}, {"any": [1, {"x": "y"}]}],
        [{"never": 1}],
    ),
    "description_only_is_any_value": (
        {
            "type": "object",
            "properties": {"v": {"description": "anything at all"}},
            "required": ["v"],
            "additionalProperties": False,
        },
        [{"v": 1}, {"v": "s"}, {"v": {"nested": [True, None, -1.5e3]}}],
        [{}],
    ),
    "not_type_and_required": (
        {
            "type": "object",
            "properties": {"a": {"not": {"type": "string"}}, "b": True},
            "not": {"required": ["b"]},
            "additionalProperties": False,
        },
        [{"a": 1}, {"a": None}, {}],
        [{"a": "s"}, {"b": 1}],
    ),
}


def _formats_checkable(schema, instance) -> bool:
    import jsonschema

    known = jsonschema.FormatChecker().checkers
    props = schema.get("properties", {}) if isinstance(schema, dict) else {}
    used = {
        props[k].get("format")
        for k in (instance if isinstance(instance, dict) else {})
        if k in props and isinstance(props[k], dict)
    }
    return all(f in known for f in used if f)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schema_feature(name):
    schema, valid, invalid = CASES[name]
    compiled = compile_json_schema(schema)
    pattern = re.compile(compiled.expanded_regex())
    validator = jsonschema.validators.validator_for(schema)(
        schema, format_checker=jsonschema.FormatChecker()
    )
    for instance in valid:
        assert validator.is_valid(instance), instance
        text = canonical_json(instance, schema)
        assert pattern.fullmatch(text), (text, compiled.regex[:200])
    for instance in invalid:
        # jsonschema checks "date-time" only with rfc3339-validator installed; without it the
        # reference cannot tell, and the grammar's own verdict below still must hold
        if _formats_checkable(schema, instance):
            assert not validator.is_valid(instance), instance
        text = canonical_json(instance, schema)
        assert not pattern.fullmatch(text), text
    assert not compiled.relaxed, compiled.relaxed


def test_openapi_nullable_adds_null():
    pattern = re.compile(compile_json_schema({"type": "string", "nullable": True}).expanded_regex())
    assert pattern.fullmatch("null") and pattern.fullmatch('"x"')
    assert not pattern.fullmatch("1")


def test_uri_needs_a_scheme():
    pattern = re.compile(compile_json_schema({"type": "string", "format": "uri"}).expanded_regex())
    assert pattern.fullmatch('"urn:isbn:0451450523"')
    assert not pattern.fullmatch('"no scheme"')


def test_enum_equality_keeps_booleans_apart_at_depth():
    schema = {"allOf": [{"enum": [{"a": 0.0}, [1]]}, {"not": {"enum": [{"a": False}, [True]]}}]}
    pattern = re.compile(compile_json_schema(schema).expanded_regex())
    assert pattern.fullmatch('{"a": 0.0}') and pattern.fullmatch("[1]")


def test_whitespace_policy_is_json_dumps_defaults():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "array", "items": {"type": "integer"}},
            "b": {"type": "string"},
        },
    }
    pattern = re.compile(compile_json_schema(schema).expanded_regex())
    assert pattern.fullmatch(json.dumps({"a": [1, 2], "b": "x"}))
    assert not pattern.fullmatch('{"a":[1,2],"b":"x"}')
    assert not pattern.fullmatch('{ "a": [1, 2], "b": "x" }')


def test_key_order_follows_schema():
    schema = {
        "type": "object",
        "properties": {"first": {"type": "integer"}, "second": {"type": "integer"}},
    }
    text = canonical_json({"second": 2, "first": 1, "extra": 3}, schema)
    assert text == '{"first": 1, "second": 2, "extra": 3}'
    assert re.fullmatch(compile_json_schema(schema).expanded_regex(), text)


def test_relaxed_keywords_are_listed_and_strict_mode_raises():
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    compiled = compile_json_schema(schema)
    assert any("uniqueItems" in r for r in compiled.relaxed)
    assert re.fullmatch(compiled.expanded_regex(), "[1, 1]")  # accepted: relaxed
    with pytest.raises(GrammarError) as info:
        compile_json_schema(schema, JsonSchemaOptions(strict=True))
    assert info.value.feature == "uniqueItems"


@pytest.mark.parametrize(
    "schema, feature",
    [
        ({"type": "integer", "minimum": 5, "maximum": 4}, "unsatisfiable"),
        (False, "unsatisfiable"),
        ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "unsatisfiable"),
        ({"type": "wat"}, "type"),
        ("{not json", "json"),
        ([1, 2], "schema"),
        ({"$ref": "#/definitions/missing"}, "$ref"),
        ({"type": "string", "pattern": "(?<=a)b"}, None),
    ],
)
def test_errors_name_the_feature(schema, feature):
    if feature is None:  # an unsupported pattern is relaxed, or raised in strict mode
        with pytest.raises(GrammarError) as info:
            compile_json_schema(schema, JsonSchemaOptions(strict=True))
        assert info.value.feature == "pattern"
        return
    with pytest.raises(GrammarError) as info:
        compile_json_schema(schema)
    assert info.value.feature == feature


def test_size_limit_raises():
    props = {
        f"p{i}": {"type": "object", "properties": {"q": {"type": "integer"}}} for i in range(50)
    }
    with pytest.raises(GrammarError) as info:
        compile_json_schema(
            {"type": "object", "properties": props}, JsonSchemaOptions(max_regex_chars=2000)
        )
    assert info.value.feature == "size"


def test_long_length_bounds_stay_exact_slots():
    compiled = compile_json_schema({"type": "string", "minLength": 300, "maxLength": 5000})
    assert len(compiled.regex) < 10  # a slot placeholder, not 5000 DFA positions
    index = next(i for i in range(len(compiled.slots)) if compiled.slot_char(i) in compiled.regex)
    slot = compiled.slots[index]
    assert (slot.kind, slot.min_length, slot.max_length) == ("string", 300, 5000)


def test_many_optional_properties_stay_linear():
    props = {f"k{i}": {"type": "integer"} for i in range(150)}
    compiled = compile_json_schema(
        {"type": "object", "properties": props, "additionalProperties": False}
    )
    assert len(compiled.regex) < 150 * 120
    pattern = re.compile(compiled.expanded_regex())
    assert pattern.fullmatch(canonical_json({"k3": 1, "k149": 2}, {"properties": props}))
    assert not pattern.fullmatch('{"k149": 2, "k3": 1}')
