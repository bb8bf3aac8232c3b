"""SGLang's own JSON regexes compile on the default backend (issues 12 and 15, item 10).

SGLang's ``json_decode`` example constrains with a hand-written regex of bounded
``[\\w\\d\\s]{1,16}`` fields and with ``build_regex_from_object`` (outlines' schema-to-regex
conversion); as DFAs over a real vocabulary these are ~25k states, which the outlines backend
refuses as too large. llguidance builds its lexer lazily, so both compile in milliseconds.
"""

from __future__ import annotations

import json
import time

import pytest

CHARACTER_REGEX = (
    r"""\{\n"""
    r"""    "name": "[\w\d\s]{1,16}",\n"""
    r"""    "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)",\n"""
    r"""    "blood status": "(Pure-blood|Half-blood|Muggle-born)",\n"""
    r"""    "occupation": "(student|teacher|auror|ministry of magic|death eater|order of the """
    r"""phoenix)",\n"""
    r"""    "wand": \{\n"""
    r"""        "wood": "[\w\d\s]{1,16}",\n"""
    r"""        "core": "[\w\d\s]{1,16}",\n"""
    r"""        "length": [0-9]{1,2}\.[0-9]{0,2}\n"""
    r"""    \},\n"""
    r"""    "alive": "(Alive|Deceased)",\n"""
    r"""    "patronus": "[\w\d\s]{1,16}",\n"""
    r"""    "bogart": "[\w\d\s]{1,16}"\n"""
    r"""\}"""
)
HERMIONE = (
    '{\n    "name": "Hermione Granger",\n    "house": "Gryffindor",\n'
    '    "blood status": "Muggle-born",\n    "occupation": "student",\n    "wand": {\n'
    '        "wood": "Vine",\n        "core": "Dragon string",\n        "length": 10.75\n'
    '    },\n    "alive": "Alive",\n    "patronus": "Otter",\n    "bogart": "Failure"\n}'
)
WIZARD = {
    "properties": {
        "name": {"title": "Name", "type": "string"},
        "age": {"title": "Age", "type": "integer"},
        "weapon": {"$ref": "#/$defs/Weapon"},
    },
    "required": ["name", "age", "weapon"],
    "title": "Wizard",
    "type": "object",
    "$defs": {
        "Weapon": {
            "enum": ["sword", "axe", "mace", "spear", "bow", "crossbow"],
            "title": "Weapon",
            "type": "string",
        }
    },
}


def _accepts(compiler, grammar, tokenizer, text: str) -> bool:
    matcher = grammar.matcher()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.accept_tokens(ids) and matcher.accept_token(sorted(compiler.info.eos_ids)[0])


def test_json_decode_character_regex(llg3, llama3):
    started = time.monotonic()
    grammar = llg3.compile_regex(CHARACTER_REGEX)
    assert time.monotonic() - started < 5
    assert _accepts(llg3, grammar, llama3, HERMIONE)
    too_long = HERMIONE.replace("Hermione Granger", "Hermione Jean Granger")  # 21 > 16
    assert not _accepts(llg3, grammar, llama3, too_long)


def test_build_regex_from_object_output(llg3, llama3):
    outlines_schema = pytest.importorskip("outlines_core.json_schema")
    regex = outlines_schema.build_regex_from_schema(json.dumps(WIZARD))
    grammar = llg3.compile_regex(regex)
    good = json.dumps({"name": "Gandalf", "age": 2019, "weapon": "sword"})
    assert _accepts(llg3, grammar, llama3, good)
    assert not _accepts(llg3, grammar, llama3, good.replace("sword", "wand"))
