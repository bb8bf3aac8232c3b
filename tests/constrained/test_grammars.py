"""EBNF and Lark grammars on the llguidance backend: masks, complete outputs, jump-forward.

Grammars reach the compiler the way the engine sends them: ``SamplingParams(...).constraint``.
Outputs are checked by independent parsers (Python's ``ast`` for arithmetic, ``json``), never
by the grammar under test.
"""

from __future__ import annotations

import ast
import json
import random

import pytest

from radixlm.constrained import GrammarError
from radixlm.sampling_params import SamplingParams

YES_NO = 'root ::= "yes" | "no"'
ARITHMETIC = """
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= "0" | [1-9] [0-9]{0,3} | "(" expr ")"
"""
INT_LIST = 'start: "[" NUM ("," NUM)* "]"\nNUM: /0|[1-9][0-9]{0,2}/'
COLOURS_EBNF = 'root ::= "{\\"colours\\": [\\"" [a-z]+ "\\"]}"'
COLOURS_REGEX = r'\{"colours": \["[a-z]+"\]\}'


def _compile(compiler, **constraint):
    kind, spec = SamplingParams.from_dict(constraint).constraint
    return compiler.submit(kind, spec).result(timeout=60)


def _spelling(compiler, token_id: int) -> bytes:
    return compiler.info.vocab.token_bytes[token_id]


def _walk(compiler, grammar, seed: int, max_tokens: int = 48, stop_p: float = 0.4):
    """Sample uniformly among the allowed tokens; returns (text, complete)."""
    rng = random.Random(seed)
    matcher = grammar.matcher()
    eos = compiler.info.eos_ids
    out = b""
    for _ in range(max_tokens):
        allowed = matcher.allowed_token_ids()
        assert allowed, f"dead end after {out!r}"
        text_ids = [t for t in allowed if t not in eos]
        if matcher.is_complete() and (not text_ids or rng.random() < stop_p):
            assert matcher.accept_token(next(iter(eos)))
            return out.decode("utf-8"), True
        token = rng.choice(text_ids)
        assert matcher.accept_token(token)
        out += _spelling(compiler, token)
    return out.decode("utf-8"), False


@pytest.fixture(params=["llg3", "llg2"], ids=["llama3", "llama2"])
def llg(request):
    return request.getfixturevalue(request.param)


def test_ebnf_yes_no_allows_only_prefixes_then_only_eos(llg):
    grammar = _compile(llg, ebnf=YES_NO)
    matcher = grammar.matcher()
    allowed = matcher.allowed_token_ids()
    spellings = {_spelling(llg, t) for t in allowed}
    assert spellings and all(s and (b"yes".startswith(s) or b"no".startswith(s)) for s in spellings)
    assert {b"yes", b"no"} <= spellings  # the whole words are single tokens in both vocabs
    # the SentencePiece word token "▁yes" spells " yes": a grammar is taken as written
    assert b" yes" not in spellings
    yes = next(t for t in allowed if _spelling(llg, t) == b"yes")
    assert matcher.accept_token(yes) and matcher.is_complete()
    assert set(matcher.allowed_token_ids()) == set(llg.info.eos_ids)


def test_ebnf_arithmetic_outputs_parse_as_arithmetic(llg3):
    grammar = _compile(llg3, ebnf=ARITHMETIC)
    matcher = grammar.matcher()
    plus = llg3.info.tokenizer.encode("+", add_special_tokens=False)
    assert not matcher.accept_token(plus[-1])  # an expression cannot start with an operator
    complete = 0
    for seed in range(12):
        text, done = _walk(llg3, grammar, seed)
        if not done:
            continue
        complete += 1
        tree = ast.parse(text, mode="eval")
        kinds = {type(node).__name__ for node in ast.walk(tree)}
        assert kinds <= {"Expression", "BinOp", "Constant", "Add", "Sub", "Mult", "Div"}, text
        assert all(c in "0123456789+-*/()" for c in text), text
    assert complete >= 6


def test_lark_int_list_outputs_parse_as_json(llg):
    grammar = _compile(llg, lark=INT_LIST)
    complete = 0
    for seed in range(10):
        text, done = _walk(llg, grammar, seed)
        if done:
            complete += 1
            value = json.loads(text)
            assert isinstance(value, list) and value, text
            assert all(isinstance(v, int) and 0 <= v <= 999 for v in value), text
            assert " " not in text, text
    assert complete >= 5


def test_a_grammar_is_compiled_once_and_shared(llg3):
    assert _compile(llg3, ebnf=YES_NO) is _compile(llg3, ebnf=YES_NO)


@pytest.mark.parametrize(
    "lark, reason",
    [("start: foo", 'unknown name: "foo"'), ('start: "a"\nstart: "b"', "")],
)
def test_an_invalid_lark_grammar_fails_with_llguidance_reason(llg3, lark, reason):
    with pytest.raises(GrammarError) as info:
        llg3.submit("lark", lark).result(timeout=60)
    assert str(info.value).startswith("llguidance:") and reason in str(info.value)


def test_the_outlines_backend_refuses_grammars_saying_they_need_llguidance(compiler3):
    with pytest.raises(GrammarError) as info:
        compiler3.submit(*SamplingParams(ebnf=YES_NO).constraint).result(timeout=60)
    assert "need the llguidance grammar backend" in str(info.value)
    assert info.value.feature == "kind"


def test_jump_forward_splices_a_grammar_like_the_equivalent_regex(llg3):
    """The same forced text, the same healed splice: the model's own tokenization of the
    whole answer starts with the spliced tokens, and the rest of it is accepted under the
    grammar token by token until the grammar is complete."""
    tokenizer = llg3.info.tokenizer
    natural = tokenizer.encode('{"colours": ["red"]}', add_special_tokens=False)
    grammar_matcher = _compile(llg3, ebnf=COLOURS_EBNF).matcher()
    regex_matcher = llg3.submit("regex", COLOURS_REGEX).result(timeout=60).matcher()
    splice = grammar_matcher.apply_jump_forward(None)
    assert splice is not None and splice == regex_matcher.apply_jump_forward(None)
    assert splice.text == '{"colours": ["' and splice.rollback == 0
    ids = list(splice.token_ids)
    assert natural[: len(ids)] == ids and grammar_matcher.num_accepted == len(ids)
    for token in natural[len(ids) :]:
        assert token in grammar_matcher.allowed_token_ids()
        assert grammar_matcher.accept_token(token)
    assert grammar_matcher.is_complete()


def test_jump_forward_leaves_a_word_boundary_to_the_model(llg3):
    """Forced ``The answer is `` then yes/no: the splice stops before `` is`` (a longer token
    starts with it), so the model writes the boundary itself, as token healing does."""
    matcher = _compile(llg3, lark='start: "The answer is " ANSWER\nANSWER: "yes" | "no"').matcher()
    assert matcher.jump_forward() == "The answer is "
    splice = matcher.apply_jump_forward(None)
    spliced = b"".join(_spelling(llg3, t) for t in splice.token_ids)
    assert spliced and b"The answer is ".startswith(spliced) and spliced != b"The answer is "
    tokenizer = llg3.info.tokenizer
    rest = tokenizer.encode("The answer is yes", add_special_tokens=False)[len(splice.token_ids) :]
    assert matcher.accept_tokens(rest) and matcher.is_complete()
