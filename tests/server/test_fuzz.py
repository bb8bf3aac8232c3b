"""Bad input gets a clear error, never a 500, and nothing is lost.

A property-based fuzz of every request route against the real server (demo model, one server for
the module): request bodies mix valid fields with wrong types, out-of-range values, NaN/inf,
nested garbage and unknown fields; raw bodies are not JSON at all. Every answer must be below 500,
and every error must be OpenAI-shaped with a message. Afterwards the server must still serve, and
after a flush every KV slot must be back in the pool.

Output budgets stay tiny (or invalid) so that a request the server accepts finishes in
milliseconds; a hung request fails the test through the client's timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

VOCAB = 2048  # the demo model's vocabulary (checked against /server_info below)
CONTEXT = 4096
BIG = 10**30
REQUEST_TIMEOUT_S = 60
# RADIXLM_FUZZ_EXAMPLES=1000 hunts longer (the default keeps this file well under a minute)
EXAMPLES = int(os.environ.get("RADIXLM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_CHEAP = settings(FUZZ, max_examples=EXAMPLES * 4 // 3)


@pytest.fixture(scope="module")
def server(launch_server, demo_model_dir):
    # no --max-queued-requests: a 503 queue_full cannot happen, so every 5xx is a bug
    return launch_server(["--model", str(demo_model_dir), "--kv-cache-tokens", "4096",
                          "--max-running-requests", "8"])


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client:
        info = client.get("/server_info").json()
        assert info["vocab_size"] == VOCAB and info["context_length"] == CONTEXT
        yield client


# ---- checking an answer -------------------------------------------------------------------


def assert_error_shape(body: object) -> dict:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def check_answer(response: httpx.Response, request: object) -> None:
    """Below 500; errors OpenAI-shaped; streams end with [DONE] and carry no internal error."""
    status = response.status_code
    assert status < 500, f"{status} for {request!r}: {response.text[:500]}"
    if status >= 400:
        assert_error_shape(response.json())
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        _check_stream(response.text, request)
    else:
        response.json()


def _check_stream(text: str, request: object) -> None:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", f"unterminated stream for {request!r}: {text[-300:]}"
    for data in events[:-1]:
        chunk = json.loads(data)
        if "error" in chunk:
            error = assert_error_shape(chunk)
            assert error["type"] != "internal_server_error", (request, error)


def fuzz_check(response: httpx.Response, request: object) -> None:
    """check_answer, counting statuses (``pytest --hypothesis-show-statistics`` shows them)."""
    event(f"status {response.status_code}")
    check_answer(response, request)


def post(http: httpx.Client, path: str, body: object) -> httpx.Response:
    # allow_nan: JSON as the server parses it (Python's json) accepts NaN and Infinity
    content = json.dumps(body, allow_nan=True).encode()
    return http.post(path, content=content, headers={"content-type": "application/json"})


# ---- strategies ---------------------------------------------------------------------------
#
# Each field has valid values and bad ones (wrong type, out of range, NaN/inf, garbage). A body
# is one of: all fields valid (it must work), valid but for one field (the error must be about
# it), or every field drawn from both (anything goes). Without the first two, nearly every body
# has some bad field and the paths past validation would hardly be exercised.

NON_FINITE = [math.nan, math.inf, -math.inf]
# JSON's \ud800 escapes: valid JSON, not valid Unicode (hypothesis' text() almost never has them)
LONE_SURROGATES = ["\ud800", "a\udc00b", "\udfff\ud800"]
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-BIG, BIG) | st.floats() | st.text(max_size=8)
    | st.sampled_from(LONE_SURROGATES),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6)
not_a_dict = junk.filter(lambda value: not isinstance(value, dict))


@dataclass(frozen=True)
class Field:
    """A request field's valid values and bad ones (the listed ones, and garbage)."""

    valid: st.SearchStrategy
    bad: st.SearchStrategy

    @property
    def any(self) -> st.SearchStrategy:
        return st.one_of(self.valid, self.bad)


def field(valid: st.SearchStrategy, *bad: object, garbage: bool = True) -> Field:
    listed = [st.sampled_from(bad)] if bad else []
    return Field(valid, st.one_of(*listed, *([junk] if garbage else [])))


def body(required: dict[str, Field], optional: dict[str, Field]) -> st.SearchStrategy:
    """Request bodies over these fields (see above), sometimes with unknown fields added."""
    def dicts(kind: str) -> st.SearchStrategy:
        out = st.fixed_dictionaries({k: getattr(f, kind) for k, f in required.items()},
                                    optional={k: getattr(f, kind) for k, f in optional.items()})
        return out.map(_compatible) if kind == "valid" else out

    extras = st.dictionaries(st.sampled_from(["bogus", "x-extra", "", "metadata"]), junk,
                             max_size=2)
    one_bad = _one_bad(dicts("valid"), {**required, **optional})
    # valid bodies are drawn twice as often: they are the ones that reach the engine
    return st.one_of(dicts("valid"), dicts("valid"), one_bad, dicts("any"),
                     st.builds(lambda extra, known: {**extra, **known}, extras, dicts("any")))


CONSTRAINTS = ("regex", "json_schema", "choices", "response_format")


def _compatible(request: dict) -> dict:
    """Drop the combinations of valid values that are invalid together."""
    out = dict(request)
    given = [k for k in CONSTRAINTS if out.get(k) not in (None, {"type": "text"})]
    for name in given[1:]:  # one output constraint at a time
        del out[name]
    for low, high in (("min_tokens", "max_tokens"), ("min_new_tokens", "max_new_tokens")):
        if low in out and high in out:
            out[low] = min(out[low], out[high])
    if "best_of" in out:
        out["best_of"] = out.get("n", 1)
    if out.get("top_logprobs") and not out.get("logprobs"):
        out["logprobs"] = True
    if out.get("continue_final_message"):
        out["add_generation_prompt"] = False
    return out


@st.composite
def _one_bad(draw, valid: st.SearchStrategy, fields: dict[str, Field]) -> dict:
    name = draw(st.sampled_from(sorted(fields)))
    return {**draw(valid), name: draw(fields[name].bad)}


# Valid budgets stay tiny; invalid ones are negative, over the context, or not integers.
# Never null: that means "up to the context", thousands of tokens on this CPU.
budget = field(st.integers(0, 4), -1, -(2**63), CONTEXT + 1, 10**6, 2**63, BIG, 2.5, "lots",
               [4], {"n": 4})
token_id = st.integers(0, VOCAB - 1)
bad_token_ids = st.lists(st.one_of(token_id, st.sampled_from([-1, -3, VOCAB, VOCAB + 3, BIG,
                                                              -BIG, 2**63])), min_size=1,
                         max_size=5).filter(lambda ids: any(not 0 <= t < VOCAB for t in ids))
token_ids = Field(st.lists(token_id, min_size=1, max_size=5), st.one_of(bad_token_ids, junk))
text = st.text(max_size=12)
regex = field(st.sampled_from(["[0-9]{1,3}", "a|b", "(yes|no)", "[a-z]+"]),
              "(", "[z-a]", "\\", "a{2,1}", "(?<=a)b", "\\1", "a{1000000}")
schema_valid = st.sampled_from([{"type": "object"}, {"type": "integer"},
                                {"type": "string", "maxLength": 3}, {"enum": ["a", "b"]}])
schema = field(st.one_of(schema_valid, schema_valid.map(json.dumps)),
               {"type": "no-such-type"}, {"type": "string", "pattern": "("}, {"enum": [math.nan]},
               {"type": "integer", "minimum": BIG}, {"$ref": "#/nope"}, "{not json", "null",
               "[]", 5, True, [])
response_format = field(
    st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
              st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema":
                                     st.fixed_dictionaries({"name": text, "schema": schema_valid},
                                                           optional={"strict": st.booleans()})}),
              st.fixed_dictionaries({"type": st.just("regex"), "regex": regex.valid})),
    {"type": "xml"}, {"type": "json_schema"}, {"type": "regex"}, {"type": 5},
    {"type": "json_schema", "json_schema": {"schema": 5}})
response_format = Field(response_format.valid, st.one_of(
    response_format.bad,
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": st.fixed_dictionaries({"schema": schema.bad})}),
    st.fixed_dictionaries({"type": st.just("regex"), "regex": regex.bad})))
logit_bias = field(
    st.dictionaries(token_id.map(str), st.floats(-100, 100), max_size=3),
    {"-1": 1}, {str(VOCAB): 1}, {str(BIG): 1}, {" 1": 1}, {"1_0": 1}, {"\u0661": 1},
    {"1.5": 1}, {"0x1": 1}, {"x": 1}, {"1": 101}, {"1": "a"}, {"1": math.nan}, {"1": math.inf},
    [1, 2])
stop = field(st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3),
                                                        max_size=3),
             [1], [""], "", {"a": 1}, [None])
flag = field(st.booleans())
finite_float = st.floats(allow_nan=False, allow_infinity=False)


def number(low: float, high: float, *bad: object) -> Field:
    return field(st.floats(low, high), *bad, *NON_FINITE)


SAMPLING = {
    "temperature": number(0, 2, -1, -1e-9, 101, 1e308, "hot"),
    "top_p": number(0.01, 1, 0, 1.0001, -0.5),
    "top_k": field(st.integers(1, 50) | st.just(-1), 0, -2, -BIG, 2.5),
    "min_p": number(0, 1, -0.1, 1.5),
    "presence_penalty": number(-2, 2, 3, -3),
    "frequency_penalty": number(-2, 2, 3, -3),
    "repetition_penalty": number(0.5, 2, 0, -1, 11),
    "n": field(st.integers(1, 3), 0, -1, 65, 10**6, 1.5),
    "seed": field(st.integers(0, 2**64), -1, -BIG, 1.5, "seven"),
    "stop": stop,
    "stop_token_ids": field(st.lists(token_id, max_size=3), [-1], [VOCAB], [BIG], 5),
    "ignore_eos": flag,
    "skip_special_tokens": flag,
    "logit_bias": logit_bias,
}
# The fields both OpenAI routes share (plus radixlm's extensions on them).
OPENAI_COMMON = {
    **SAMPLING,
    "model": field(st.just("radixlm-demo"), "gpt-4", ""),
    "stream": flag,
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()}),
                            {"include_usage": [1]}, "yes"),
    "response_format": response_format,
    "user": field(text),
    "best_of": field(st.just(1), 0, 2, -1),
    "min_tokens": field(st.integers(0, 1), -1, BIG),
    "regex": regex,
    "json_schema": schema,
    "rid": field(st.uuids().map(str)),
    "tools": field(st.just([]), [{"type": "function"}]),
    "suffix": field(st.none(), "tail"),
}

prompt_text = st.text(min_size=1, max_size=12)
completion_prompt = field(
    st.one_of(prompt_text, st.lists(prompt_text, min_size=1, max_size=3), token_ids.valid,
              st.lists(token_ids.valid, min_size=1, max_size=3)),
    "", [], [[]], [""], [[1], []], "x" * 20000, [1.5])
completion_prompt = Field(completion_prompt.valid, st.one_of(completion_prompt.bad,
                                                             bad_token_ids))
completion_bodies = body({"prompt": completion_prompt, "max_tokens": budget}, {
    **OPENAI_COMMON,
    "logprobs": field(st.integers(0, 5), -1, 21),
    "echo": flag,
})

content_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system"]),
     "content": st.one_of(text, st.lists(content_part, min_size=1, max_size=2))})
bad_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["tool", "bogus", "", 5])}, optional={
        "content": text}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
        st.lists(st.fixed_dictionaries({"type": st.sampled_from(["image_url", 5, ""])}),
                 min_size=1), st.integers(), st.dictionaries(text, text, min_size=1))}),
    junk)
messages = Field(st.lists(message, min_size=1, max_size=3),
                 st.one_of(st.just([]), st.lists(bad_message, min_size=1, max_size=2), junk))
chat_bodies = body({"messages": messages, "max_tokens": budget}, {
    **OPENAI_COMMON,
    "max_completion_tokens": budget,
    "logprobs": flag,
    "top_logprobs": field(st.integers(0, 5), -1, 21),
    "add_generation_prompt": flag,
    "continue_final_message": field(st.just(False), [True]),
})

native_fields = {
    **SAMPLING,
    "min_new_tokens": field(st.integers(0, 1), -1, BIG),
    "regex": regex,
    "json_schema": schema,
    "choices": field(st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=3),
                     [], [""], "abc", {"a": 1}, [1]),
}
native_sampling = body({"max_new_tokens": budget}, native_fields)
generate_prompts = {
    "text": field(st.one_of(prompt_text, st.lists(prompt_text, min_size=1, max_size=2)),
                  "", [""], [], "x" * 20000, [1]),
    "input_ids": Field(st.one_of(token_ids.valid,
                                 st.lists(token_ids.valid, min_size=1, max_size=2)),
                       st.one_of(bad_token_ids, st.sampled_from([[[]], [[1], []], [], [1.5]]))),
}
# sampling_params is always there: without it max_new_tokens would be 128, slow on this CPU
sampling = Field(st.one_of(native_sampling, st.lists(native_sampling, min_size=1, max_size=1)),
                 not_a_dict)
generate_fields = {
    "stream": flag,
    "return_logprob": flag,
    "logprob_start_len": field(st.integers(-1, 0), -2, BIG, 10**6),
    "top_logprobs_num": field(st.integers(0, 5), -1, 21),
    "rid": field(st.uuids().map(str)),
}
# a valid body has exactly one of text / input_ids; the wild ones may have both or neither
generate_bodies = st.one_of(
    body({"text": generate_prompts["text"], "sampling_params": sampling}, generate_fields),
    body({"input_ids": generate_prompts["input_ids"], "sampling_params": sampling},
         generate_fields),
    body({"sampling_params": sampling}, {**generate_prompts, **generate_fields}))

tokenize_bodies = body({}, {
    "prompt": field(text), "text": field(text), "messages": messages,
    "add_special_tokens": flag, "add_generation_prompt": flag,
    "model": OPENAI_COMMON["model"],
})
detokenize_bodies = body({"tokens": token_ids}, {
    "skip_special_tokens": flag, "model": OPENAI_COMMON["model"]})
# abort_all stays off: an abort of everything would be no bad input's fault
abort_bodies = body({}, {"rid": field(st.uuids().map(str)),
                         "abort_all": field(st.just(False), [1], {"a": 1}, "maybe",
                                           garbage=False)})


# ---- the fuzz -----------------------------------------------------------------------------


@FUZZ
@given(request=completion_bodies)
def test_fuzz_completions(http, request):
    fuzz_check(post(http, "/v1/completions", request), request)


@FUZZ
@given(request=chat_bodies)
def test_fuzz_chat_completions(http, request):
    fuzz_check(post(http, "/v1/chat/completions", request), request)


@FUZZ
@given(request=generate_bodies)
def test_fuzz_generate(http, request):
    fuzz_check(post(http, "/generate", request), request)


@FUZZ_CHEAP
@given(route=st.sampled_from(["/tokenize", "/detokenize", "/abort"]), data=st.data())
def test_fuzz_tokenize_detokenize_abort(http, route, data):
    strategy = {"/tokenize": tokenize_bodies, "/detokenize": detokenize_bodies,
                "/abort": abort_bodies}[route]
    request = data.draw(strategy)
    fuzz_check(post(http, route, request), request)


ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
          "/abort"]
raw_body = st.one_of(
    st.binary(max_size=40), st.text(max_size=40).map(str.encode),
    junk.map(lambda value: json.dumps(value).encode()),
    st.sampled_from([b"", b"{", b"[]", b"null", b"{\"prompt\": \"x\",}", b"\xff\xfe{}",
                     b"{\"prompt\": NaN}", b"{\"a\": 1}{\"b\": 2}"]))
content_type = st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-"
                                "urlencoded", "multipart/form-data; boundary=x"])


@FUZZ_CHEAP
@given(route=st.sampled_from(ROUTES), content=raw_body, kind=content_type)
def test_fuzz_raw_bodies(http, route, content, kind):
    headers = {"content-type": kind} if kind else {}
    response = http.post(route, content=content, headers=headers)
    fuzz_check(response, (route, content, kind))
    if content in (b"", b"{") and kind == "application/json":
        assert response.status_code == 400


@pytest.mark.parametrize("route", ROUTES)
def test_huge_strings_are_refused_quickly(http, route):
    huge = "x" * 2_000_000
    request = {"/generate": {"text": huge, "sampling_params": {"max_new_tokens": 1}},
               "/v1/completions": {"prompt": huge, "max_tokens": 1},
               "/v1/chat/completions": {"messages": [{"role": "user", "content": huge}],
                                        "max_tokens": 1},
               "/tokenize": {"prompt": huge, "model": huge},
               "/detokenize": {"tokens": [1], "model": huge},
               "/abort": {"rid": huge}}[route]
    started = time.monotonic()
    response = post(http, route, request)
    check_answer(response, route)
    assert response.status_code in (200, 400)
    assert time.monotonic() - started < 30


# ---- regressions: inputs that once got a 500 or killed the engine core --------------------


def _gen(**sampling) -> dict:
    return {"text": "x", "sampling_params": {"max_new_tokens": 2, **sampling}}


REGRESSIONS = [
    # an unhashable constraint reached the grammar cache and killed the engine core
    ("/generate", _gen(regex=["a"]), "regex"),
    ("/generate", _gen(choices={"a": 1}), "choices"),
    # wrong types the engine let through: a 500 (AttributeError, TypeError in the detokenizer)
    ("/generate", _gen(logit_bias=[1, 2]), "logit_bias"),
    ("/generate", _gen(skip_special_tokens=[1]), "skip_special_tokens"),
    # ... or a 200 that ignored what was asked (a dict of stop strings, a list as a flag)
    ("/generate", _gen(ignore_eos={"a": 1}), "ignore_eos"),
    ("/generate", _gen(stop={"a": 1}), "stop"),
    # NaN passes every range check; it sampled token 0 forever
    ("/generate", _gen(temperature=math.nan), "temperature"),
    ("/generate", _gen(top_p=math.nan), "top_p"),
    ("/generate", _gen(repetition_penalty=math.inf), "repetition_penalty"),
    ("/generate", _gen(logit_bias={"1": math.nan}), "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": math.nan}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                              "frequency_penalty": -math.inf}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"1": math.inf}},
     "logit_bias"),
    # int() reads these as token ids; they are not
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {" 1": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"1_0": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"\u0661": 1}},
     "logit_bias"),
    # an empty prompt inside a batch: 500 (min() of an empty sequence in the engine)
    ("/generate", {"input_ids": [[]]}, "input_ids"),
    ("/generate", {"input_ids": [[1], []]}, "input_ids"),
    # token ids out of range were decoded (for echo) before the engine checked them: 500
    ("/v1/completions", {"prompt": [-1], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [BIG], "max_tokens": 2, "echo": True}, "prompt"),
    ("/v1/completions", {"prompt": [[1], [-1]], "max_tokens": 2}, "prompt"),
    # both spellings of the prompt: one was silently dropped
    ("/tokenize", {"prompt": "x", "text": "y"}, "text"),
    # NaN inside a schema: compiled into a grammar whose output ("NaN") is not JSON
    ("/generate", _gen(json_schema={"enum": [math.nan]}), "sampling_params"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "n", "schema": {"type": "number",
                                                          "maximum": math.inf}}}},
     "response_format"),
    # lone surrogates: a 500 from the tokenizer (TypeError) or from the UTF-8 response (rid)
    ("/generate", {"text": "\ud800"}, "text"),
    ("/generate", {"text": "x", "rid": "\ud800", "sampling_params": {"max_new_tokens": 1}},
     "rid"),
    ("/generate", _gen(choices=["\udc00"]), "sampling_params"),
    ("/v1/completions", {"prompt": "a\udc00", "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logit_bias": {"\ud800": 1}},
     "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}],
                              "max_tokens": 1}, "messages"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/abort", {"rid": "\udfff"}, "rid"),
]


@pytest.mark.parametrize("route, request_body, param", REGRESSIONS,
                         ids=[f"{r}:{json.dumps(b, allow_nan=True)[:60]}"
                              for r, b, _ in REGRESSIONS])
def test_regression_input_is_a_400_naming_the_field(http, route, request_body, param):
    response = post(http, route, request_body)
    assert response.status_code == 400, response.text
    # the OpenAI models name the exact place ("logit_bias.1"); the field is what matters
    assert assert_error_shape(response.json())["param"].split(".")[0] == param
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000,
                                     b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
                                     b'{"prompt": "caf\xe9"}'],
                         ids=["nested-too-deep", "5000-digit-integer", "latin-1"])
def test_unparsable_bodies_say_why(http, content):
    response = http.post("/v1/completions", content=content,
                         headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON body" in assert_error_shape(response.json())["message"]


def test_wrong_method_names_the_right_one(http):
    response = http.get("/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "use POST" in assert_error_shape(response.json())["message"]


def test_queue_full_message_says_retry_once(http):
    from radixlm.engine.errors import QueueFullError
    from radixlm.server.errors import from_exception

    err = from_exception(QueueFullError("the server is busy: 9 requests in flight; retry later"))
    assert err.message.count("retry later") == 1
    assert from_exception(QueueFullError()).message.endswith("; retry later")


# ---- many bad and good requests at once -----------------------------------------------------

BAD_BODIES = [(route, request) for route, request, _ in REGRESSIONS] + [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": CONTEXT * 2}),
    ("/v1/completions", {"prompt": "x", "n": 0}),
    ("/v1/chat/completions", {"messages": [], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}], "max_tokens": 2}),
    ("/generate", _gen(regex="([0-9")),
    ("/generate", _gen(json_schema={"type": "no-such-type"})),
    # refused late (the engine core compiles the grammar), after the stream was opened
    ("/generate", {**_gen(regex="([0-9"), "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                              "stream": True, "n": 2, "response_format": {
                                  "type": "json_schema",
                                  "json_schema": {"name": "bad", "schema": {"type": "nope"}}}}),
]


async def _good(client: httpx.AsyncClient, index: int) -> dict:
    request = {"prompt": f"good request {index}", "max_tokens": 6, "temperature": 0,
               "ignore_eos": True, "stream": index % 3 == 0}
    response = await client.post("/v1/completions", json=request)
    assert response.status_code == 200, response.text
    if not request["stream"]:
        choice = response.json()["choices"][0]
        return {"text": choice["text"], "finish": choice["finish_reason"],
                "tokens": response.json()["usage"]["completion_tokens"]}
    _check_stream(response.text, request)
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    return {"text": "".join(c["choices"][0]["text"] for c in chunks if c["choices"]),
            "finish": chunks[-1]["choices"][0]["finish_reason"], "tokens": 6}


async def _bad(client: httpx.AsyncClient, route: str, request: dict) -> int:
    content = json.dumps(request, allow_nan=True).encode()
    response = await client.post(route, content=content,
                                 headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, (route, request, response.text)
    assert_error_shape(response.json())
    return response.status_code


async def _storm(url: str, good: int) -> tuple[list[dict], list[int]]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as c:
        goods = [_good(c, i) for i in range(good)]
        bads = [_bad(c, route, request) for route, request in BAD_BODIES]
        results = await asyncio.gather(*goods, *bads)
    return list(results[:good]), list(results[good:])


def test_concurrent_bad_requests_leave_good_ones_intact(server, http):
    good = 50 - len(BAD_BODIES)
    # greedy, so each good request has one right answer: what it gets when run alone
    expected = [post(http, "/v1/completions", {"prompt": f"good request {i}", "max_tokens": 6,
                                               "temperature": 0, "ignore_eos": True})
                .json()["choices"][0]["text"] for i in range(good)]
    goods, bads = asyncio.run(_storm(server.url, good))
    assert all(400 <= status < 500 for status in bads)
    for i, result in enumerate(goods):
        assert result == {"text": expected[i], "finish": "length", "tokens": 6}, i


async def _same_rid(url: str, count: int, stream: bool) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        return await asyncio.gather(*(client.post("/generate", json={
            "text": "mine", "rid": "shared-rid", "stream": stream,
            "sampling_params": {"max_new_tokens": 20, "ignore_eos": True}})
            for _ in range(count)))


@pytest.mark.parametrize("stream", [False, True])
def test_duplicate_rids_sent_at_once_do_not_abort_the_request_that_holds_it(server, stream):
    # Regression: both passed the route's check; the engine refused the second, and the server
    # then aborted "its" rid -- the first request's -- which finished after one token.
    responses = asyncio.run(_same_rid(server.url, 16, stream))
    refused = [r for r in responses if r.status_code == 400]
    assert all(assert_error_shape(r.json())["param"] == "rid" for r in refused)
    served = [r for r in responses if r.status_code == 200]
    assert len(served) + len(refused) == len(responses) and served
    for response in served:
        if response.text.startswith("data: "):
            _check_stream(response.text, "stream")
            last = json.loads(response.text.split("data: ")[-2])
        else:
            last = response.json()
        assert last["meta_info"]["finish_reason"]["type"] == "length", last
        assert last["meta_info"]["completion_tokens"] == 20


# ---- after all of it ----------------------------------------------------------------------


def _wait_idle(http: httpx.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = http.get("/server_info").json()
        if info["running_requests"] == 0 and info["waiting_requests"] == 0:
            return
        assert time.monotonic() < deadline, f"requests still running: {info}"
        time.sleep(0.1)


def test_server_is_healthy_and_no_kv_slot_leaked(server, http):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    out = post(http, "/v1/completions", {"prompt": "still here", "max_tokens": 3,
                                         "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    _wait_idle(http)
    assert http.post("/flush_cache").json()["success"] is True
    info = http.get("/server_info").json()
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]
    assert info["inflight_requests"] == 0
    assert server.proc.poll() is None
