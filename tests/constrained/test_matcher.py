"""Matchers of both backends on both real tokenizers: accept, reject, rollback, EOS, masks."""

from __future__ import annotations

import json

import pytest
import torch

from radixlm.constrained import GrammarError

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(params=["outlines-llama3", "outlines-llama2", "llguidance-llama3",
                        "llguidance-llama2"])
def setup(request):
    backend, tokenizer = request.param.split("-")
    name = {"outlines": "compiler", "llguidance": "llg"}[backend] + tokenizer[-1]
    return request.getfixturevalue(name), request.getfixturevalue(tokenizer)


def _eos(compiler):
    return sorted(compiler.info.eos_ids)[0]


def test_valid_json_accepted_token_by_token_then_eos(setup, feed):
    compiler, tok = setup
    grammar = compiler.compile_json_schema(PERSON)
    for value in [{"name": "Ann", "age": 7}, {"name": "Élodie \"Z\"", "age": 150,
                                              "tags": ["a b", ""]}]:
        matcher = grammar.matcher()
        assert feed(matcher, tok, json.dumps(value, ensure_ascii=False))
        assert matcher.is_complete()
        assert matcher.accept_token(_eos(compiler))
        assert matcher.is_terminated()
        assert not matcher.accept_token(tok.encode("x", add_special_tokens=False)[-1])


@pytest.mark.parametrize("text", ['{"age": 3, "name": "x"}', '{"name": "x", "age": 151}',
                                  '{"name": "0123456789abc", "age": 1}', '{"name":"x","age":1}'])
def test_invalid_json_rejected(setup, feed, text):
    compiler, tok = setup
    matcher = compiler.compile_json_schema(PERSON).matcher()
    assert not (feed(matcher, tok, text) and matcher.accept_token(_eos(compiler)))


def test_reject_leaves_state_unchanged_and_rollback_restores(setup, feed):
    compiler, tok = setup
    matcher = compiler.compile_json_schema(PERSON).matcher()
    assert feed(matcher, tok, '{"name": "Bo')
    before = matcher.allowed_token_ids()
    wrong = tok.encode("\n", add_special_tokens=False)[-1]
    assert not matcher.accept_token(wrong)
    assert matcher.allowed_token_ids() == before
    accepted = matcher.num_accepted
    assert feed(matcher, tok, 'b", "age": 4')
    matcher.rollback(matcher.num_accepted - accepted)
    assert matcher.allowed_token_ids() == before
    with pytest.raises(ValueError):
        matcher.rollback(matcher.num_accepted + 1)


def test_eos_only_in_a_final_state(setup, feed):
    compiler, tok = setup
    eos = _eos(compiler)
    matcher = compiler.compile_json_schema({"type": "integer"}).matcher()
    assert eos not in matcher.allowed_token_ids()
    assert not matcher.accept_token(eos)
    assert feed(matcher, tok, "12")
    assert eos in matcher.allowed_token_ids() and matcher.is_complete()
    assert not matcher.is_terminated()  # more digits may follow
    assert matcher.accept_token(eos) and matcher.is_terminated()
    matcher.rollback(1)
    assert not matcher.is_terminated() and matcher.accept_token(eos)


def test_mask_agrees_with_accept_token(setup, feed):
    """Every id in a sample: set in the bitmask exactly when accept_token takes it."""
    compiler, tok = setup
    grammar = compiler.compile_json_schema(PERSON)
    matcher = grammar.matcher()
    probes = sorted(set(range(0, compiler.info.vocab.size, 97)) | set(
        tok.encode('{"name": "ab", "age": 12, "tags": []}', add_special_tokens=False)))
    bitmask = torch.zeros((1, compiler.words), dtype=torch.int32)
    for prefix in ["", '{"name": "', '{"name": "ab', '{"name": "ab", "age": 1']:
        matcher = grammar.matcher()
        assert feed(matcher, tok, prefix)
        matcher.fill_bitmask(bitmask, 0)
        for token in probes:
            bit = bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)
            took = matcher.accept_token(token)
            if took:
                matcher.rollback(1)
            assert bit == took, (prefix, token, tok.convert_ids_to_tokens([token]))


def test_ids_past_the_tokenizer_are_never_allowed(compiler3, llg3):
    for compiler in (compiler3, llg3):
        matcher = compiler.compile_json_object().matcher()
        bitmask = torch.full((1, compiler.words), -1, dtype=torch.int32)
        matcher.fill_bitmask(bitmask, 0)
        assert compiler.vocab_size == 128256 + 64
        assert all(i < 128256 for i in matcher.allowed_token_ids())
        assert not matcher.accept_token(128256 + 5)


def test_regex_and_choices(setup, feed):
    compiler, tok = setup
    eos = _eos(compiler)
    regex = compiler.compile_regex(r"(ac|[^a])+")  # the outlines Index bug case
    matcher = regex.matcher()
    assert feed(matcher, tok, "acac") and matcher.accept_token(eos)
    number = compiler.compile_json_schema({"type": "number"}).matcher()
    assert feed(number, tok, "1.5") and number.accept_token(eos)
    choice = compiler.compile_choices(["yes", "no", "maybe so"])
    for text in ["yes", "maybe so"]:
        matcher = choice.matcher()
        assert feed(matcher, tok, text) and matcher.accept_token(eos)
    matcher = choice.matcher()
    assert not (feed(matcher, tok, "ye") and matcher.accept_token(eos))


def test_sentencepiece_leading_space_token(compiler2, llg2, llama2, feed):
    """Llama 2 encodes '{"a": 1}' as '▁{"' ...: the grammar must take the dummy space."""
    ids = llama2.encode('{"a": 1}', add_special_tokens=False)
    assert llama2.convert_ids_to_tokens(ids)[0].startswith("\u2581")
    for compiler in (compiler2, llg2):
        matcher = compiler.compile_json_schema({"type": "object"}).matcher()
        assert all(matcher.accept_token(t) for t in ids) and matcher.accept_token(2)


def test_jump_forward_returns_forced_text(setup, feed):
    compiler, tok = setup
    matcher = compiler.compile_json_schema(PERSON).matcher()
    assert feed(matcher, tok, "{")
    assert matcher.jump_forward() == '"name": "'
    assert feed(matcher, tok, '"name": "Al", ')
    assert matcher.jump_forward() == '"age": '
    free = compiler.compile_json_object().matcher()
    assert feed(free, tok, '{"')
    assert free.jump_forward() is None


def test_apply_jump_forward_retokenizes_the_boundary(setup, feed):
    compiler, tok = setup
    matcher = compiler.compile_json_schema(PERSON).matcher()
    first = tok.encode("{", add_special_tokens=False)[-1]
    assert matcher.accept_token(first)
    splice = matcher.apply_jump_forward(first)
    assert splice is not None and splice.text == '"name": "'
    kept = [first] if splice.rollback == 0 else []
    out = tok.decode(kept + list(splice.token_ids))
    # the splice stops before ` "`, which the tokenizer merges with the value's first letters:
    # the model writes it (token healing); the grammar still forces it
    assert out.lstrip() == '{"name":'
    assert not matcher.accept_token(tok.encode("x", add_special_tokens=False)[-1])
    # the matcher is past the splice: finishing the value works
    assert feed(matcher, tok, ' "Al", "age": 3}') and matcher.is_complete()


def test_unbounded_and_long_bounded_strings(compiler3, llama3, feed):
    grammar = compiler3.compile_json_schema({"type": "string", "minLength": 3,
                                             "maxLength": 1000})
    ok = grammar.matcher()
    assert feed(ok, llama3, json.dumps("x" * 1000)) and ok.is_complete()
    long = grammar.matcher()
    assert not feed(long, llama3, json.dumps("x" * 1001))
    short = grammar.matcher()
    assert not (feed(short, llama3, '"ab"') and short.is_complete())


def test_invalid_specs_raise_grammar_error(setup):
    compiler, _ = setup
    with pytest.raises(GrammarError):
        compiler.compile_regex("(a|b")
    with pytest.raises(GrammarError):
        compiler.compile_json_schema("{not json")
    with pytest.raises(GrammarError):
        compiler.compile_choices([])


def test_undeclared_key_cannot_reuse_a_declared_name(compiler3, compiler2, llama3, llama2, feed):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for compiler, tok in ((compiler3, llama3), (compiler2, llama2)):
        grammar = compiler.compile_json_schema(schema)
        ok = grammar.matcher()
        assert feed(ok, tok, '{"a": 1, "ab": "s", "b": [1]}') and ok.is_complete()
        bad = grammar.matcher()
        assert not (feed(bad, tok, '{"a": "s"}') and bad.is_complete())
        late = grammar.matcher()
        assert not (feed(late, tok, '{"b": 1, "a": 2}') and late.is_complete())


def test_batched_mask_fill_equals_row_by_row(llg3, compiler3, llama3, feed):
    """``fill_bitmasks`` (llguidance: one executor call for the batch) writes exactly what
    ``fill_bitmask`` writes row by row, for matchers in different states, an ended one
    included, and leaves the rows it is not given alone."""
    grammar = llg3.compile_json_schema(PERSON)
    prefixes = ["", '{"name": "A', '{"name": "Ann", "age": 1', '{"name": "Ann", "age": 7}']
    matchers = []
    for text in prefixes * 3:
        matcher = grammar.matcher()
        assert feed(matcher, llama3, text) if text else True
        matchers.append(matcher)
    assert matchers[3].accept_token(_eos(llg3)) and matchers[3].is_terminated()
    words = -(-grammar.vocab_size // 32)
    rows = [(2 * i + 1, m) for i, m in enumerate(matchers)]  # every other row
    batched = torch.full((2 * len(matchers) + 1, words), 7, dtype=torch.int32)
    type(matchers[0]).fill_bitmasks(batched, rows)
    one_by_one = torch.full_like(batched, 7)
    for row, matcher in rows:
        matcher.fill_bitmask(one_by_one, row)
    assert torch.equal(batched, one_by_one)
    assert (batched[0::2] == 7).all()
    # the default implementation (outlines) is the row loop itself
    outlines = compiler3.compile_json_schema(PERSON).matcher()
    mask = torch.zeros((1, -(-outlines.vocab_size // 32)), dtype=torch.int32)
    type(outlines).fill_bitmasks(mask, [(0, outlines)])
    assert mask.any()
