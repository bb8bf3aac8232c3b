"""The programs in examples/ run against a real `radixlm serve` of the demo model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_server(server_runtime):
    """The session's ``radixlm serve`` of the demo model (see conftest)."""
    return server_runtime


pytestmark = pytest.mark.slow


def test_quickstart(demo_server):
    result = load("quickstart").main(demo_server.url)
    assert isinstance(result["answer"], str) and isinstance(result["streamed"], str)


def test_few_shot_qa(demo_server):
    cached = load("few_shot_qa").main(demo_server.url)
    assert len(cached["compiled"]) == 4


def test_tree_of_thought(demo_server):
    result = load("tree_of_thought").main(demo_server.url)
    assert len(result["plan"]) == 3 and all(len(steps) == 2 for steps in result["step"])
    assert result["best"] in {"1", "2", "3"}


def test_json_extraction(demo_server):
    module = load("json_extraction")
    records = module.main(demo_server.url)["records"]
    import jsonschema

    for record in records:
        jsonschema.validate(record["person"], module.PERSON_SCHEMA)
        assert isinstance(record["attendees"], int)
        json.dumps(record)


def test_multi_turn_chat(demo_server):
    result = load("multi_turn_chat").main(demo_server.url)
    assert [m["role"] for m in result["messages"]][:3] == ["system", "user", "assistant"]
    assert result["cached"][1] > 0  # the second turn reuses the first from the cache


def test_agent_loop(demo_server):
    module = load("agent_loop")
    result = module.main(demo_server.url)
    assert result["calls"], "the agent made no tool call"
    for tool, argument in result["calls"]:
        assert tool in ("calculator", "lookup")
        if tool == "calculator":
            int(module.calculator(argument))
        else:
            assert argument in module.FACTS
