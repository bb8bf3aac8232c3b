"""SamplingParams' grammar constraints: ``ebnf`` (GBNF / XGrammar EBNF) and ``lark``."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from radixlm.sampling_params import SamplingParams, SamplingParamsError

YES_NO = 'root ::= "yes" | "no"'


def test_ebnf_becomes_a_lark_constraint_with_start_for_root():
    kind, text = SamplingParams.from_dict({"ebnf": YES_NO}).constraint
    assert kind == "lark"
    assert "start:" in text and '"yes"' in text and '"no"' in text
    assert "::=" not in text


def test_lark_is_taken_as_written():
    grammar = 'start: "a" NUM\nNUM: /[0-9]+/'
    assert SamplingParams.from_dict({"lark": grammar}).constraint == ("lark", grammar)


@pytest.mark.parametrize("field", ["ebnf", "lark"])
@pytest.mark.parametrize("value", [5, ["root ::= x"], {"a": 1}, True])
def test_a_grammar_that_is_not_a_string_names_its_field(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({field: value})
    assert info.value.field == field and "string" in str(info.value)


@pytest.mark.parametrize("field", ["ebnf", "lark"])
@pytest.mark.parametrize("value", ["", "   \n\t"])
def test_an_empty_grammar_names_its_field(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({field: value})
    assert info.value.field == field and "non-empty" in str(info.value)


@pytest.mark.parametrize(
    "grammar, reason",
    [
        ('root ::= "yes', "Unexpected end of input"),  # unterminated literal
        ('answer ::= "yes"', "No 'root' rule"),
        ("root ::= missing", "Rule 'missing' not found"),
        ("root = 'x'", "Expected ::="),
        ('root ::= [a-z] "x" {2,', "Expected"),
    ],
)
def test_an_ebnf_syntax_error_names_the_field_and_the_reason(grammar, reason):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"ebnf": grammar})
    assert info.value.field == "ebnf"
    assert "not a valid EBNF grammar" in str(info.value) and reason in str(info.value)


def test_deep_nesting_is_an_error_not_a_crash():
    grammar = "root ::= " + "(" * 5000 + '"x"' + ")" * 5000
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"ebnf": grammar})
    assert info.value.field == "ebnf"


@pytest.mark.parametrize(
    "other", [{"regex": "a+"}, {"json_schema": "{}"}, {"choices": ["a"]}, {"lark": 'start: "a"'}]
)
def test_a_grammar_excludes_every_other_constraint(other):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"ebnf": YES_NO, **other})
    (name,) = other
    # the later field in CONSTRAINT_FIELDS order is named, the earlier one in the message
    assert {info.value.field, str(info.value).rsplit(" ", 1)[-1]} == {"ebnf", name}
    assert "cannot be combined" in str(info.value)


def test_grammar_params_survive_copies_and_pickling():
    """n > 1 fans out with dataclasses.replace; requests reach the core process pickled."""
    params = SamplingParams.from_dict({"ebnf": YES_NO, "n": 2})
    for copy in (dataclasses.replace(params, n=1), pickle.loads(pickle.dumps(params))):
        copy.validate()
        assert copy.constraint == params.constraint
    assert params.to_dict()["ebnf"] == YES_NO


def test_the_engine_core_gets_the_converted_grammar_with_the_params(monkeypatch):
    """The conversion is pure Python: done once where the params are validated, it travels
    (pickled) with them, so the core's scheduling loop never runs it."""
    params = SamplingParams.from_dict({"ebnf": 'root ::= "x" [0-9]+'})
    expected = params.constraint
    arrived = pickle.loads(pickle.dumps(params))

    def refuse(text):
        raise AssertionError("converted again")

    monkeypatch.setattr("radixlm.sampling_params.ebnf_to_lark", refuse)
    assert arrived.constraint == expected
    arrived.ebnf = 'root ::= "y"'  # changed after validation: the kept conversion is stale
    with pytest.raises(AssertionError, match="converted again"):
        arrived.constraint  # noqa: B018


def _chain(rules: int, literals: int = 1) -> str:
    body = " ".join(['"a"'] * literals)
    lines = [f"r{i} ::= {body} r{i + 1}" for i in range(rules - 2)]
    return "\n".join([*lines, f'r{rules - 2} ::= "b"', "root ::= r0"])


def test_ebnf_size_limits_keep_the_conversion_bounded():
    """llguidance's converter takes one pass over all rules per rule it resolves: 4,000
    chained rules take ~10 s. The limits refuse such grammars with the reason; the worst
    grammar they allow (measured: 0.2 s) still converts."""
    from radixlm.sampling_params import MAX_EBNF_CHARS, MAX_EBNF_RULES

    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"ebnf": _chain(MAX_EBNF_RULES + 1)})
    assert info.value.field == "ebnf" and f"at most {MAX_EBNF_RULES}" in str(info.value)
    big = 'root ::= "' + "x" * MAX_EBNF_CHARS + '"'
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"ebnf": big})
    assert info.value.field == "ebnf" and "use lark" in str(info.value)
    worst = _chain(MAX_EBNF_RULES, literals=(MAX_EBNF_CHARS // MAX_EBNF_RULES - 20) // 4)
    assert len(worst) <= MAX_EBNF_CHARS
    kind, lark = SamplingParams.from_dict({"ebnf": worst}).constraint
    assert kind == "lark" and lark.count("\n") >= MAX_EBNF_RULES
