"""EBNF and Lark grammars end to end on the real SmolLM2-135M-Instruct (CPU)."""

from __future__ import annotations

import ast
import json

import pytest

from radixlm.engine.errors import RequestError

pytestmark = pytest.mark.slow

ARITHMETIC = """
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= "0" | [1-9] [0-9]{0,3} | "(" expr ")"
"""


def _chat(engine, question: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def test_ebnf_yes_no_answers_with_a_word_of_the_grammar(smollm2_engine):
    prompt = _chat(smollm2_engine, "Is the sky blue on a clear day? Answer yes or no.")
    out = smollm2_engine.generate(
        prompt, {"max_new_tokens": 8, "temperature": 0.0, "ebnf": 'root ::= "yes" | "no"'}
    )
    assert out["text"] in ("yes", "no"), out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_ebnf_arithmetic_samples_parse(smollm2_engine):
    prompt = _chat(smollm2_engine, "Write an arithmetic expression that equals 12.")
    outs = smollm2_engine.generate(
        [prompt] * 4,
        [
            {"max_new_tokens": 24, "temperature": 0.8, "seed": seed, "ebnf": ARITHMETIC}
            for seed in range(4)
        ],
    )
    for out in outs:
        text = out["text"]
        assert text and all(c in "0123456789+-*/()" for c in text), text
        if out["meta_info"]["finish_reason"]["type"] == "stop":  # not cut by max_new_tokens
            tree = ast.parse(text, mode="eval")
            assert {type(n).__name__ for n in ast.walk(tree)} <= {
                "Expression", "BinOp", "Constant", "Add", "Sub", "Mult", "Div"
            }, text  # fmt: skip


def test_lark_grammar_with_jump_forward_keeps_the_models_token_boundary(smollm2_engine):
    """The grammar forces ``{"colours": ["``; the splice ends where the model's own
    tokenization of the answer has a boundary, and the model names the colour, as the
    JSON-schema request does."""
    lark = 'start: "{\\"colours\\": [\\"" WORD "\\"]}"\nWORD: /[a-z]+/'
    question = "I painted the fence red. Which colours did I use? Answer in JSON."
    prompt = _chat(smollm2_engine, question)
    out = smollm2_engine.generate(prompt, {"max_new_tokens": 12, "temperature": 0.0, "lark": lark})
    assert out["text"] == '{"colours": ["red"]}', out["text"]
    assert json.loads(out["text"]) == {"colours": ["red"]}
    assert out["meta_info"]["jump_forward_tokens"] > 0
    # the same language as a regex: the same tokens, the same splices
    regex = r'\{"colours": \["[a-z]+"\]\}'
    same = smollm2_engine.generate(prompt, {"max_new_tokens": 12, "temperature": 0.0,
                                            "regex": regex})  # fmt: skip
    assert same["output_ids"] == out["output_ids"]
    assert same["meta_info"]["jump_forward_tokens"] == out["meta_info"]["jump_forward_tokens"]


def test_an_invalid_grammar_is_a_request_error_and_the_engine_goes_on(smollm2_engine):
    with pytest.raises(RequestError) as info:
        smollm2_engine.generate("x", {"max_new_tokens": 4, "lark": "start: nothing_here"})
    assert "invalid constraint" in str(info.value) and "nothing_here" in str(info.value)
    with pytest.raises(RequestError) as info:
        smollm2_engine.generate("x", {"max_new_tokens": 4, "ebnf": 'root ::= "open'})
    assert info.value.param == "ebnf"
    out = smollm2_engine.generate("x", {"max_new_tokens": 4, "ebnf": 'root ::= "ok"'})
    assert out["text"] == "ok"
