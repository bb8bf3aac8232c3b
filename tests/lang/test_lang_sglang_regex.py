"""SGLang's own JSON regexes compile and constrain through the language (issue 15, item 10).

``examples/frontend_language/usage/json_decode.py`` in SGLang constrains with two regexes: a
hand-written one (bounded ``[\\w\\d\\s]{1,16}`` fields: a large automaton at SmolLM2's 49k
vocabulary) and ``build_regex_from_object(Wizard)``, which is outlines' JSON-schema-to-regex
conversion of a pydantic model (``outlines_core.json_schema.build_regex_from_schema`` here).
Both programs run unchanged on SmolLM2 with the default grammar backend.
"""

from __future__ import annotations

import json
import re
from enum import Enum

import pytest
from pydantic import BaseModel

import radixlm_lang as sgl

pytestmark = pytest.mark.slow

character_regex = (
    r"""\{\n"""
    + r"""    "name": "[\w\d\s]{1,16}",\n"""
    + r"""    "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)",\n"""
    + r"""    "blood status": "(Pure-blood|Half-blood|Muggle-born)",\n"""
    + r"""    "occupation": "(student|teacher|auror|ministry of magic|death eater|order of the phoenix)",\n"""  # noqa: E501
    + r"""    "wand": \{\n"""
    + r"""        "wood": "[\w\d\s]{1,16}",\n"""
    + r"""        "core": "[\w\d\s]{1,16}",\n"""
    + r"""        "length": [0-9]{1,2}\.[0-9]{0,2}\n"""
    + r"""    \},\n"""
    + r"""    "alive": "(Alive|Deceased)",\n"""
    + r"""    "patronus": "[\w\d\s]{1,16}",\n"""
    + r"""    "bogart": "[\w\d\s]{1,16}"\n"""
    + r"""\}"""
)


@sgl.function
def character_gen(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information.\n"
    s += "The JSON output is:\n"
    s += sgl.gen("json_output", max_tokens=160, regex=character_regex)


class Weapon(str, Enum):
    sword = "sword"
    axe = "axe"
    mace = "mace"
    spear = "spear"
    bow = "bow"
    crossbow = "crossbow"


class Wizard(BaseModel):
    name: str
    age: int
    weapon: Weapon


def build_regex_from_object(model: type[BaseModel]) -> str:
    from outlines_core.json_schema import build_regex_from_schema

    return build_regex_from_schema(json.dumps(model.model_json_schema()))


@sgl.function
def pydantic_wizard_gen(s):
    s += "Give me a description about a wizard in the JSON format.\n"
    s += sgl.gen("character", max_tokens=64, temperature=0, regex=build_regex_from_object(Wizard))


@pytest.fixture
def engine_backend(smollm2_engine):
    sgl.set_default_backend(sgl.EngineBackend(smollm2_engine))
    yield
    sgl.set_default_backend(None)


def test_sglang_character_regex_compiles_and_constrains(engine_backend):
    state = character_gen.run(name="Hermione Granger", temperature=0)
    assert state.error() is None, state.error()
    assert re.fullmatch(character_regex, state["json_output"]), state["json_output"]
    assert json.loads(state["json_output"])["house"] in (
        "Gryffindor", "Slytherin", "Ravenclaw", "Hufflepuff"
    )  # fmt: skip


def test_build_regex_from_object_compiles_and_constrains(engine_backend):
    state = pydantic_wizard_gen.run()
    assert state.error() is None, state.error()
    Wizard.model_validate_json(state["character"])
