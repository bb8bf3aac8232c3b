"""Jump-forward splices keep the tokenizer's own token boundaries (real tokenizers).

A splice is checked against the tokenizer's tokenization of the whole document: walking a valid
instance token by token as the tokenizer spells it, every splice jump-forward makes must be
exactly the tokens that come next in that spelling. A splice that ended inside a token the
tokenizer would merge with the following text (`` [`` where the document has `` ["``) fails.
"""

from __future__ import annotations

import json

import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "home": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "colours": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            },
            "required": ["city", "colours"],
            "additionalProperties": False,
        },
        "people": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
                    "age": {"type": "integer"},
                    "name": {"type": "string"},
                },
                "required": ["tags", "age", "name"],
                "additionalProperties": False,
            },
        },
        "last": {"type": "string"},
    },
    "required": ["home", "people", "last"],
    "additionalProperties": False,
}
DOCS = [
    {
        "home": {"city": "Oslo", "colours": ["red", "blue"]},
        "people": [
            {"tags": ["a", "b"], "age": 3, "name": "Ann"},
            {"tags": [], "age": 41, "name": "Bo"},
        ],
        "last": "x",
    },
    {
        "home": {"city": "é", "colours": ["x"]},
        "people": [{"tags": ["b"], "age": -7, "name": ""}],
        "last": "",
    },
]
# Boundaries the documents cross (inside one token or between two), each checked at least once
# in or right around a splice.
BOUNDARIES = ['{"', '":', ': "', ', "', '["', "[{", "},", '"]', "}]", '"}', ": [", ": {", "]}"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """SmolLM2's tokenizer, from the GGUF's cached HF-format companion."""
    from transformers import AutoTokenizer

    from radixlm.model.gguf import prepare_gguf

    return AutoTokenizer.from_pretrained(str(prepare_gguf(smollm2_gguf)))


@pytest.fixture(scope="module")
def llg_smollm2(smollm2):
    from radixlm.constrained import GrammarCompiler

    with GrammarCompiler(smollm2, backend="llguidance") as compiler:
        yield compiler


def walk(compiler, doc: str) -> tuple[list[tuple[int, int]], list[int], tuple]:
    """Accept ``doc`` as the tokenizer spells it, jumping forward wherever the grammar forces
    text. Returns the splices as (start, end) token positions in that spelling, the spelling
    and the token bytes. Fails if a splice is not the spelling's next tokens."""
    matcher = compiler.submit("json_schema", json.dumps(SCHEMA)).result().matcher()
    natural = matcher.retokenizer.encode(doc)
    splices: list[tuple[int, int]] = []
    i = 0
    while i < len(natural):
        assert matcher.accept_token(natural[i]), (i, natural[i])
        i += 1
        splice = matcher.apply_jump_forward(natural[i - 1])
        if splice is None:
            continue
        start = i - splice.rollback
        end = start + len(splice.token_ids)
        assert list(splice.token_ids) == natural[start:end], (
            _spell(matcher, natural[start:end]),
            _spell(matcher, splice.token_ids),
        )
        splices.append((start, end))
        i = end
    assert matcher.is_complete()
    return splices, natural, matcher.retokenizer.vocab.token_bytes


def _spell(matcher, ids) -> list[bytes]:
    return [matcher.retokenizer.vocab.token_bytes[t] for t in ids]


@pytest.mark.parametrize("which", ["llg3", "llg2", "llg_smollm2"])
def test_splices_are_the_tokenizers_own_tokens(which, request):
    compiler = request.getfixturevalue(which)
    crossed: set[str] = set()
    spliced = 0
    for value in DOCS:
        doc = json.dumps(value, ensure_ascii=False)
        splices, natural, spell = walk(compiler, doc)
        spliced += sum(end - start for start, end in splices)
        text = doc.encode()
        for start, end in splices:
            lo = len(b"".join(spell[t] for t in natural[:start]))
            hi = len(b"".join(spell[t] for t in natural[:end]))
            crossed.update(b for b in BOUNDARIES if b.encode() in text[max(lo - 3, 0) : hi + 3])
    assert spliced >= 10, "jump-forward spliced almost nothing"
    assert crossed == set(BOUNDARIES), set(BOUNDARIES) - crossed


@pytest.mark.parametrize("which", ["llama3", "llama2", "smollm2"])
def test_heal_backs_off_a_token_that_a_longer_one_extends(which, request):
    """`` [`` (Llama 3, SmolLM2) / ``▁[`` (Llama 2) is extended by `` ["``: the model writes it."""
    from radixlm.constrained.retokenize import Retokenizer
    from radixlm.constrained.vocab import build_token_vocab

    tokenizer = request.getfixturevalue(which)
    retok = Retokenizer(tokenizer, build_token_vocab(tokenizer))
    forced = retok.encode('{"colours": [')
    healed = retok.heal(forced)
    full = retok.encode('{"colours": ["red"]}')
    assert healed == full[: len(healed)]
    assert retok.vocab.decode_bytes(healed) == b'{"colours":'


def test_memoized_splices_equal_fresh_ones_and_stay_unchanged(llg3, llama3):
    """splice_candidates answers from its memo after the first call: the same candidates a
    fresh derivation gives, and a caller mutating its copy does not reach the memo."""
    retok = llg3.info.retokenizer
    last = llama3.encode(" Ann", add_special_tokens=False)[-1]
    cases = [('", "age": ', last, 3), ('", "age": ', last, 0), (', "tags": [', None, 0)]
    for forced, token, accepted in cases:
        fresh = retok._splice_candidates(forced, token if accepted > 0 else None)
        first = retok.splice_candidates(forced, token, accepted)
        assert first == fresh and first
        first[0][1].append(-1)
        assert retok.splice_candidates(forced, token, accepted) == fresh
