"""Grammar constraints over HTTP: native ``sampling_params.ebnf/lark``; OpenAI ``ebnf`` (SGLang)
and vLLM's ``guided_grammar`` / ``guided_regex`` / ``guided_json`` / ``guided_choice``.

The live tests run the real server (subprocess) on the random-weight demo model: whatever it
writes, a constrained output must parse by the grammar, and a broken grammar must be a 400
with the reason.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from radixlm.server.errors import APIError
from radixlm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    constraint_param,
    constraint_params,
)

YES_NO = 'root ::= "yes" | "no"'
YES_NO_LARK = 'start: "yes" | "no"'
INT_LIST_LARK = 'start: "[" NUM ("," NUM)* "]"\nNUM: /0|[1-9][0-9]{0,2}/'
MODEL = "demo"


# ---- request -> engine constraint (pure) ----------------------------------------------------


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], **fields}
    )


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"ebnf": YES_NO}, {"ebnf": YES_NO}),
        ({"guided_grammar": YES_NO}, {"ebnf": YES_NO}),
        (  # an EBNF rule may have any name and leading spaces
            {"guided_grammar": '  answer ::= "x"\nroot ::= answer'},
            {"ebnf": '  answer ::= "x"\nroot ::= answer'},
        ),
        ({"guided_grammar": YES_NO_LARK}, {"lark": YES_NO_LARK}),
        (
            {"guided_grammar": '%llguidance {}\nstart: "::="'},
            {"lark": '%llguidance {}\nstart: "::="'},
        ),
        ({"guided_regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"guided_json": {"type": "integer"}}, {"json_schema": {"type": "integer"}}),
        ({"guided_choice": ["a", "b"]}, {"choices": ["a", "b"]}),
        ({"structured_outputs": {"grammar": YES_NO}}, {"ebnf": YES_NO}),
        ({"structured_outputs": {"grammar": YES_NO_LARK}}, {"lark": YES_NO_LARK}),
        ({"structured_outputs": {"regex": "a+"}}, {"regex": "a+"}),
        ({"structured_outputs": {"choice": ["a"]}}, {"choices": ["a"]}),
        ({"structured_outputs": {"json": {"type": "null"}}}, {"json_schema": {"type": "null"}}),
        ({"structured_outputs": {"json_object": True}}, {"json_schema": '{"type": "object"}'}),
        ({"structured_outputs": {"json_object": False}}, {}),
        ({"response_format": {"type": "regex", "regex": "x+"}}, {"regex": "x+"}),
        ({"response_format": {"type": "text"}, "guided_regex": "y"}, {"regex": "y"}),
        ({}, {}),
    ],
)
def test_openai_constraint_fields_map_to_engine_fields(fields, expected):
    for request in (_chat(**fields), CompletionRequest.model_validate({"prompt": "x", **fields})):
        assert constraint_params(request) == expected


@pytest.mark.parametrize(
    "fields, second",
    [
        ({"regex": "a", "guided_regex": "b"}, "guided_regex"),
        ({"ebnf": YES_NO, "guided_grammar": YES_NO}, "guided_grammar"),
        ({"guided_json": {}, "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_grammar": YES_NO, "response_format": {"type": "json_object"}}, "response_format"),
        (
            {"guided_grammar": YES_NO, "structured_outputs": {"grammar": YES_NO}},
            "structured_outputs.grammar",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ],
)
def test_two_constraints_are_a_400_naming_the_second(fields, second):
    with pytest.raises(APIError) as info:
        constraint_params(_chat(**fields))
    assert info.value.status == 400 and info.value.param == second
    assert "cannot be combined" in str(info.value)


def test_errors_name_the_field_the_client_used():
    assert constraint_param(_chat(guided_grammar=YES_NO)) == "guided_grammar"
    assert constraint_param(_chat(response_format={"type": "json_object"})) == "response_format"
    assert constraint_param(_chat(structured_outputs={"grammar": "x"})) == (
        "structured_outputs.grammar"
    )
    assert constraint_param(_chat()) is None


# ---- the live server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(launch_server, demo_model_dir):
    return launch_server(["--model", str(demo_model_dir), "--served-model-name", MODEL,
                          "--kv-cache-tokens", "4096"])  # fmt: skip


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def _int_list(text: str) -> list[int]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, int) for v in value), text
    return value


@pytest.mark.slow
def test_native_ebnf_and_lark(http):
    for grammar in ({"ebnf": YES_NO}, {"lark": YES_NO_LARK}):
        r = http.post("/generate", json={"text": "Answer:", "sampling_params": {
            "max_new_tokens": 6, "temperature": 1.0, "seed": 3, **grammar}})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["text"] in ("yes", "no")
    r = http.post("/generate", json={"text": ["a", "b"], "sampling_params": {
        "max_new_tokens": 24, "temperature": 1.0, "seed": 1, "lark": INT_LIST_LARK}})  # fmt: skip
    assert r.status_code == 200, r.text
    for out in r.json():
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            _int_list(out["text"])
        else:  # cut by the budget: still a prefix of the grammar's language
            assert re.fullmatch(r"\[(0|[1-9][0-9]{0,2})?(,(0|[1-9][0-9]{0,2})?)*", out["text"])


@pytest.mark.slow
def test_native_broken_grammars_are_400s_with_the_reason(http):
    for stream in (False, True):
        err = _error(http.post("/generate", json={"text": "x", "stream": stream,
                                                  "sampling_params": {
            "max_new_tokens": 4, "lark": "start: missing_rule"}}))  # fmt: skip
        assert "missing_rule" in err["message"], err
        err = _error(http.post("/generate", json={"text": "x", "stream": stream,
                                                  "sampling_params": {
            "max_new_tokens": 4, "ebnf": 'root ::= "open'}}))  # fmt: skip
        assert err["param"] == "ebnf" and "not a valid EBNF grammar" in err["message"], err
    err = _error(http.post("/generate", json={"text": "x", "sampling_params": {"ebnf": ""}}))
    assert err["param"] == "ebnf" and "non-empty" in err["message"]
    err = _error(http.post("/generate", json={"text": "x", "sampling_params": {
        "ebnf": YES_NO, "regex": "a"}}))  # fmt: skip
    assert "cannot be combined" in err["message"]
    # the server still serves
    ok = http.post("/generate", json={"text": "x", "sampling_params": {"ebnf": 'root ::= "ok"'}})
    assert ok.json()["text"] == "ok"


@pytest.mark.slow
def test_openai_ebnf_and_vllm_guided_fields(client):
    out = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=6, temperature=1.0, seed=2,
        extra_body={"ebnf": YES_NO})  # fmt: skip
    assert out.choices[0].text in ("yes", "no")
    messages = [{"role": "user", "content": "numbers"}]
    for extra, check in [
        ({"guided_grammar": YES_NO}, lambda t: t in ("yes", "no")),
        ({"guided_grammar": INT_LIST_LARK}, lambda t: _int_list(t) is not None),
        ({"guided_regex": "[0-9]{3}"}, lambda t: re.fullmatch("[0-9]{3}", t)),
        ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
        ({"structured_outputs": {"grammar": YES_NO_LARK}}, lambda t: t in ("yes", "no")),
        ({"guided_json": {"type": "object", "properties": {"k": {"type": "boolean"}},
                          "required": ["k"], "additionalProperties": False}},
         lambda t: isinstance(json.loads(t)["k"], bool)),
    ]:  # fmt: skip
        chat = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=64, temperature=1.0, seed=5,
            extra_body=extra)  # fmt: skip
        choice = chat.choices[0]
        assert choice.finish_reason == "stop", (extra, choice)
        assert check(choice.message.content), (extra, choice.message.content)


@pytest.mark.slow
def test_openai_broken_grammar_is_a_400_naming_the_field(client):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], stream=stream,
                extra_body={"guided_grammar": "start: nope"})  # fmt: skip
        assert info.value.body["param"] == "guided_grammar"
        assert "nope" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}],
            extra_body={"structured_outputs": {"whitespace_pattern": " "}})  # fmt: skip
    assert info.value.body["param"] == "structured_outputs.whitespace_pattern"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", extra_body={"ebnf": "root ::= ("})
    assert info.value.body["param"] == "ebnf"
    assert "not a valid EBNF grammar" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL, prompt="x", extra_body={"ebnf": YES_NO, "guided_regex": "a"}
        )
    assert info.value.body["param"] == "ebnf"


@pytest.mark.slow
def test_a_server_on_outlines_refuses_grammars_with_a_400(launch_server, demo_model_dir):
    server = launch_server(["--model", str(demo_model_dir), "--grammar-backend", "outlines",
                            "--kv-cache-tokens", "2048"])  # fmt: skip
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            err = _error(http.post("/generate", json={"text": "x", "sampling_params": {
                "lark": YES_NO_LARK}}))  # fmt: skip
            assert err["param"] == "lark" and "llguidance" in err["message"]
            err = _error(http.post("/v1/completions", json={
                "prompt": "x", "guided_grammar": YES_NO}))  # fmt: skip
            assert err["param"] == "guided_grammar" and "llguidance" in err["message"]
    finally:
        assert server.terminate() == 0
