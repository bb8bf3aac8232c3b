"""OpenAI/native request models -> engine sampling params, checked against SamplingParams."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from radixlm.sampling_params import SamplingParams
from radixlm.server.errors import APIError, validation_message
from radixlm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    check_values,
    completion_max_tokens,
    logit_bias,
    max_tokens_field,
    message_dicts,
    native_sampling_params,
    openai_param,
    response_format_constraint,
    sampling_params,
)


def _chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest(**fields)


def test_completion_fields_map_onto_engine_names():
    req = CompletionRequest(prompt="x", temperature=0.5, top_p=0.9, seed=7, stop="END",
                            presence_penalty=0.25, frequency_penalty=-0.5, top_k=20,
                            min_tokens=2, logit_bias={"5": 10, "9": -100})
    params = sampling_params(req, max_new_tokens=16, vocab_size=100)
    assert params == {"max_new_tokens": 16, "temperature": 0.5, "top_p": 0.9, "seed": 7,
                      "presence_penalty": 0.25, "frequency_penalty": -0.5, "top_k": 20,
                      "min_new_tokens": 2, "stop": ["END"], "logit_bias": {5: 10.0, 9: -100.0}}
    built = SamplingParams.from_dict(params)  # the engine's own validator accepts it
    assert built.stop == ["END"] and built.logit_bias == {5: 10.0, 9: -100.0}


def test_unset_fields_keep_engine_defaults():
    params = sampling_params(CompletionRequest(prompt="x"), 16, 100)
    assert params == {"max_new_tokens": 16}
    assert SamplingParams.from_dict(params).temperature == SamplingParams().temperature


def test_max_tokens_precedence():
    assert completion_max_tokens(CompletionRequest(prompt="x")) == 16  # OpenAI's default
    assert completion_max_tokens(CompletionRequest(prompt="x", max_tokens=None)) is None
    assert completion_max_tokens(_chat()) is None  # chat: up to the context
    assert completion_max_tokens(_chat(max_tokens=5)) == 5
    assert completion_max_tokens(_chat(max_tokens=5, max_completion_tokens=9)) == 9


@pytest.mark.parametrize("bias, message", [
    ({"abc": 1}, "not a token id"), ({"100": 1}, "outside the vocabulary"),
    ({"-1": 1}, "outside the vocabulary"), ({"3": 101}, r"outside \[-100, 100\]"),
])
def test_logit_bias_rejects_bad_entries(bias, message):
    with pytest.raises(APIError, match=message) as err:
        logit_bias(bias, vocab_size=100)
    assert (err.value.status, err.value.param) == (400, "logit_bias")


def test_response_format_becomes_a_constraint():
    assert response_format_constraint(None) == {}
    fmt = _chat(response_format={"type": "text"}).response_format
    assert response_format_constraint(fmt) == {}
    fmt = _chat(response_format={"type": "json_object"}).response_format
    assert json.loads(response_format_constraint(fmt)["json_schema"]) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = _chat(response_format={"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": schema}}).response_format
    assert json.loads(response_format_constraint(fmt)["json_schema"]) == schema
    fmt = _chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(APIError, match="json_schema.schema"):
        response_format_constraint(fmt.response_format)
    with pytest.raises(ValidationError):
        _chat(response_format={"type": "xml"})


def test_chat_params_carry_the_constraint():
    req = _chat(response_format={"type": "json_object"}, temperature=0)
    params = sampling_params(req, 8, 100)
    assert SamplingParams.from_dict(params).constraint[0] == "json_schema"


def test_unsupported_openai_fields_are_rejected_by_name():
    with pytest.raises(APIError) as err:
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]).reject_unsupported()
    assert err.value.param == "tools"
    _chat(some_future_field=1).reject_unsupported()  # unknown, harmless fields pass


def test_message_parts_are_joined_and_non_text_rejected():
    req = _chat(messages=[{"role": "system", "content": None},
                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}]}])
    assert message_dicts(req.messages) == [{"role": "system", "content": ""},
                                           {"role": "user", "content": "ab"}]
    req = _chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                        "image_url": {"url": "x"}}]}])
    with pytest.raises(APIError) as err:
        message_dicts(req.messages)
    assert err.value.param == "messages.0.content"


def test_validation_limits():
    with pytest.raises(ValidationError):
        _chat(n=0)
    with pytest.raises(ValidationError):
        _chat(top_logprobs=21)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])
    with pytest.raises(ValidationError):
        GenerateRequest(text="x", bogus=1)  # the native API is strict


def test_engine_param_names_are_translated_for_openai_callers():
    assert openai_param("max_new_tokens") == "max_tokens"
    assert openai_param("max_new_tokens", max_tokens_field(_chat(max_completion_tokens=3))) == (
        "max_completion_tokens")
    assert max_tokens_field(_chat(max_tokens=3)) == "max_tokens"
    assert openai_param("min_new_tokens") == "min_tokens"
    assert openai_param("input_ids") == "prompt"
    assert openai_param("temperature") == "temperature"
    assert openai_param(None) is None


def test_validation_message_names_the_field():
    try:
        CompletionRequest.model_validate({"prompt": "x", "n": "many"})
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
    assert param == "n" and "n:" in message
    message, param = validation_message([{"type": "json_invalid", "loc": ("body", 3),
                                          "msg": "JSON decode error",
                                          "ctx": {"error": "Expecting value"}}])
    assert message == "malformed JSON body: Expecting value" and param is None


def test_engine_errors_map_to_statuses():
    from radixlm.engine.errors import EngineDeadError, QueueFullError, RequestError
    from radixlm.server.errors import from_exception

    err = from_exception(RequestError("bad value", "temperature"))
    assert (err.status, err.param, err.message) == (400, "temperature", "bad value")
    err = from_exception(QueueFullError("the server is busy"))
    assert (err.status, err.code) == (429, "queue_full") and "busy" in err.message
    assert int(err.headers["Retry-After"]) >= 1
    assert from_exception(EngineDeadError("core exited")).status == 503
    with pytest.raises(KeyError):  # anything else is a bug, re-raised for the 500 handler
        from_exception(KeyError("x"))


@pytest.mark.parametrize("values, param", [
    ({"regex": ["a"]}, "regex"),  # unhashable: killed the engine core's grammar cache
    ({"choices": {"a": 1}}, "choices"),
    ({"logit_bias": [1, 2]}, "logit_bias"),  # a 500: list has no .values()
    ({"skip_special_tokens": [1]}, "skip_special_tokens"),  # a 500 in the detokenizer
    ({"stop": {"a": 1}}, "stop"),  # was taken as the stop string "a"
    ({"ignore_eos": {"a": 1}}, "ignore_eos"),
    ({"temperature": math.nan}, "temperature"),  # NaN passes every range check
    ({"top_p": math.inf}, "top_p"),
    ({"logit_bias": {"1": math.nan}}, "logit_bias"),
    ({"max_new_tokens": None}, "max_new_tokens"),
    ({"json_schema": 5}, "json_schema"),
    ({"logit_bias": {"1": "high"}}, "logit_bias"),
    ({"logit_bias": {"1": "1.5"}}, "logit_bias"),
    ({"max_new_tokens": "5"}, "max_new_tokens"),
])
def test_native_sampling_params_reject_wrong_types_by_field(values, param):
    with pytest.raises(APIError) as err:
        native_sampling_params(values, vocab_size=100)
    assert (err.value.status, err.value.param) == (400, param)
    assert param in err.value.message


def test_native_sampling_params_keep_only_what_was_given():
    out = native_sampling_params({"max_new_tokens": 4, "stop": "x", "logit_bias": {"5": 1},
                                  "json_schema": {"type": "object"}, "seed": None}, 100)
    assert out == {"max_new_tokens": 4, "stop": "x", "logit_bias": {5: 1.0},
                   "json_schema": {"type": "object"}, "seed": None}
    with pytest.raises(APIError) as err:  # a misspelt key is named, not ignored
        native_sampling_params({"temprature": 1}, 100)
    assert err.value.param == "temprature"
    assert SamplingParams.from_dict(native_sampling_params({"n": 2, "top_k": 5}, 100)).n == 2


@pytest.mark.parametrize("key", [" 1", "1 ", "1_0", "\u0661", "+1", "1.0", "0x1", ""])
def test_logit_bias_keys_are_decimal_token_ids_only(key):
    with pytest.raises(APIError, match="not a token id"):
        logit_bias({key: 1.0}, vocab_size=100)
    assert logit_bias({"07": 1.0}, vocab_size=100) == {7: 1.0}


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty",
                                   "frequency_penalty", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_openai_floats_must_be_finite(field, value):
    with pytest.raises(ValidationError, match="finite"):
        CompletionRequest(prompt="x", **{field: value})
    with pytest.raises(ValidationError, match="finite"):
        CompletionRequest(prompt="x", logit_bias={"1": value})


def test_lone_surrogates_anywhere_are_named():
    check_values(_chat(messages=[{"role": "user", "content": "\U0001F600 fine"}]))
    deep: dict = {"type": "string"}
    for _ in range(2000):  # deeper than the recursion limit: the walk is a loop
        deep = {"not": deep}
    check_values(CompletionRequest(prompt="x", json_schema=deep))
    cases = [(_chat(messages=[{"role": "user", "content": "a\ud800"}]), "messages.0.content"),
             (CompletionRequest(prompt=["ok", "\udc00"]), "prompt.1"),
             (CompletionRequest(prompt="x", logit_bias={"\ud800": 1}), "logit_bias"),
             (GenerateRequest(text="x", sampling_params={"stop": ["\udfff"]}),
              "sampling_params.stop.0")]
    for request, param in cases:
        with pytest.raises(APIError) as err:
            check_values(request)
        assert (err.value.status, err.value.param) == (400, param)
        err.value.message.encode("utf-8")  # the message itself must be sendable


def test_non_finite_numbers_in_untyped_parts_are_named():
    for request, param in [
            (CompletionRequest(prompt="x", json_schema={"enum": [1, math.nan]}),
             "json_schema.enum.1"),
            (CompletionRequest(prompt="x", bogus={"a": math.inf}), "bogus.a"),
            (GenerateRequest(text="x", sampling_params={"json_schema": {"maximum": -math.inf}}),
             "sampling_params.json_schema.maximum")]:
        with pytest.raises(APIError) as err:
            check_values(request)
        assert (err.value.status, err.value.param) == (400, param)
    check_values(CompletionRequest(prompt="x", json_schema={"maximum": 1e308}))
