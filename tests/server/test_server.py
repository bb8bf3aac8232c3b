"""The real server (subprocess, demo model, no --model) driven by the openai client and httpx."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

MODEL = "demo"
KV_TOKENS = 6144
MAX_RUNNING = 8
MAX_QUEUED = 4


@pytest.fixture(scope="module")
def server(launch_server, demo_model_dir):
    return launch_server(["--model", str(demo_model_dir), "--served-model-name", MODEL,
                          "--kv-cache-tokens", str(KV_TOKENS),
                          "--max-running-requests", str(MAX_RUNNING),
                          "--max-queued-requests", str(MAX_QUEUED)])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def info(http):
    return http.get("/server_info").json()


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


GREEDY = {"temperature": 0.0, "max_tokens": 12}


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _wait_idle(http: httpx.Client, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = http.get("/server_info").json()
        if info["running_requests"] == 0 and info["waiting_requests"] == 0:
            return info
        assert time.monotonic() < deadline, f"requests still running: {info}"
        time.sleep(0.1)


def _assert_no_kv_leak(http: httpx.Client) -> None:
    _wait_idle(http)
    assert http.post("/flush_cache").json()["success"] is True
    info = http.get("/server_info").json()
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]


# ---- start-up, discovery, health ---------------------------------------------------------


def test_startup_banner_names_address_model_capacity_and_demo_notice(server, info):
    out = server.output
    assert f"listening on {server.url}" in out
    assert f"model: {MODEL}" in out
    assert f"KV cache capacity: {info['kv_capacity_tokens']} tokens" in out


def test_models_and_health(client, http, info):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/health_generate").status_code == 200
    assert info["kv_capacity_tokens"] >= KV_TOKENS - 64
    assert info["served_model_name"] == MODEL and info["config"]["model"]


# ---- generation ---------------------------------------------------------------------------


def test_native_greedy_matches_transformers(http, demo_model_dir, tokenizer):
    prompt = "The lighthouse keeper"
    out = http.post("/generate", json={"text": prompt, "sampling_params": {
        "temperature": 0, "max_new_tokens": 10, "ignore_eos": True}}).json()
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    ids = tokenizer.encode(prompt)
    ref: list[int] = []
    with torch.no_grad():
        for _ in range(10):  # plain greedy decoding, eos ignored
            logits = model(torch.tensor([ids + ref])).logits[0, -1]
            ref.append(int(logits.argmax()))
    assert out["output_ids"] == ref
    assert out["text"] == tokenizer.decode(ref, skip_special_tokens=True)
    assert out["meta_info"]["prompt_tokens"] == len(ids)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "matched": None}


def test_completion_matches_native_generate(client, http):
    prompt = "Once upon a time"
    completion = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    native = http.post("/generate", json={"text": prompt, "sampling_params": {
        "temperature": 0, "max_new_tokens": 12}}).json()
    choice = completion.choices[0]
    assert choice.text == native["text"]
    assert completion.usage.completion_tokens == native["meta_info"]["completion_tokens"]
    assert completion.usage.prompt_tokens == native["meta_info"]["prompt_tokens"]
    assert completion.usage.total_tokens == (completion.usage.prompt_tokens
                                             + completion.usage.completion_tokens)
    assert choice.finish_reason in ("length", "stop")
    # the second identical prompt was served from the radix cache
    assert completion.usage.prompt_tokens_details.cached_tokens >= 0
    again = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_chat_completion_uses_the_chat_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say hello."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                         max_completion_tokens=9)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert out.usage.prompt_tokens == len(expected)
    assert out.object == "chat.completion"
    message = out.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert out.usage.completion_tokens <= 9


def test_batch_prompts_and_echo(client):
    out = client.completions.create(model=MODEL, prompt=["Alpha", "Beta"], echo=True, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text.startswith("Alpha") and out.choices[1].text.startswith("Beta")
    single = client.completions.create(model=MODEL, prompt="Beta", **GREEDY)
    assert out.choices[1].text == "Beta" + single.choices[0].text


def test_stream_completion_with_usage(client):
    full = client.completions.create(model=MODEL, prompt="A river", **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="A river", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    assert all(c.usage is None for c in chunks[:-1])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])


def test_stream_chat_with_usage(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=10)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=10, stream=True,
        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_n_samples_are_distinct_and_seeded(client):
    kwargs = {"model": MODEL, "prompt": "Colours:", "max_tokens": 8, "temperature": 1.0,
              "n": 2, "seed": 11}
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


def test_seed_reproducibility_and_variation(client):
    def sample(seed):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=1.0,
            max_tokens=6, seed=seed).choices[0].message.content

    assert sample(42) == sample(42)
    assert len({sample(42), sample(43), sample(44)}) > 1


def test_n_streaming_interleaves_choices(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=1.0, seed=3,
        max_tokens=6, n=2, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=1.0, seed=3,
        max_tokens=6, n=2)
    assert [texts[0], texts[1]] == [c.message.content for c in plain.choices]


def test_completion_logprobs(client, http, tokenizer):
    out = client.completions.create(model=MODEL, prompt="Numbers: 1 2 3", logprobs=3, **GREEDY)
    native = http.post("/generate", json={"text": "Numbers: 1 2 3", "sampling_params": {
        "temperature": 0, "max_new_tokens": 12}}).json()
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == out.usage.completion_tokens == len(lp.token_logprobs)
    assert lp.tokens == [tokenizer.decode([i]) for i in native["output_ids"]]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the top-1
    assert lp.text_offset[0] == len("Numbers: 1 2 3")


def test_completion_echo_logprobs_cover_the_prompt(client, tokenizer):
    prompt = "Good morning"
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1,
                                    temperature=0, max_tokens=3)
    lp = out.choices[0].logprobs
    prompt_len = len(tokenizer.encode(prompt))
    # the first prompt token has no logprob (nothing precedes it): it is left out
    assert len(lp.tokens) == prompt_len + 3 - 1
    assert all(x is not None and x <= 0 for x in lp.token_logprobs)


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=5,
        logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_stop_string_truncates_and_reports(client):
    base = client.completions.create(model=MODEL, prompt="Once", temperature=0, max_tokens=24,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    start = next(i for i in range(len(text) // 3, len(text) - 1)
                 if text[i:i + 2].isalnum())  # a plain two-character window
    stop = text[start:start + 2]
    out = client.completions.create(model=MODEL, prompt="Once", temperature=0, max_tokens=24,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_native_batch_stream_and_input_logprobs(http, tokenizer):
    batch = http.post("/generate", json={"text": ["a", "b"], "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "n": 2}}).json()
    assert isinstance(batch, list) and len(batch) == 4
    assert batch[0]["output_ids"] == batch[1]["output_ids"]  # greedy samples agree
    ids = tokenizer.encode("x y z")
    out = http.post("/generate", json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": 3, "temperature": 0}, "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 2}).json()
    entries = out["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == ids and entries[0][0] is None
    assert len(out["meta_info"]["output_top_logprobs"][0]) == 2
    with http.stream("POST", "/generate", json={"input_ids": ids, "stream": True,
                                                 "sampling_params": {"max_new_tokens": 3,
                                                                     "temperature": 0}}) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["output_ids"] == out["output_ids"]
    assert "".join(c["delta"] for c in chunks) == chunks[-1]["text"]


def test_native_return_text_in_logprobs(http, tokenizer):
    """SGLang's top-level flag: True gives (logprob, id, text) entries, False (logprob, id,
    None)."""
    ids = tokenizer.encode("one two three")
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                  "ignore_eos": True},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    keys = ("input_token_logprobs", "output_token_logprobs")
    with_text = http.post("/generate", json={**body, "return_text_in_logprobs": True})
    without = http.post("/generate", json={**body, "return_text_in_logprobs": False})
    assert with_text.status_code == 200 and without.status_code == 200, without.text
    meta_t, meta_n = with_text.json()["meta_info"], without.json()["meta_info"]
    assert [e[1] for e in meta_t["input_token_logprobs"]] == ids
    for key in keys:
        assert [e[:2] for e in meta_n[key]] == [e[:2] for e in meta_t[key]]
        assert all(e[2] is None for e in meta_n[key])
        assert [e[2] for e in meta_t[key]] == [tokenizer.decode([e[1]]) for e in meta_t[key]]
    tops_t, tops_n = meta_t["output_top_logprobs"], meta_n["output_top_logprobs"]
    assert len(tops_n) == 4 and all(len(top) == 2 for top in tops_n)
    assert [[e[:2] for e in top] for top in tops_n] == [[e[:2] for e in top] for top in tops_t]
    assert all(e[2] is None for top in tops_n for e in top)
    assert all(e[2] == tokenizer.decode([e[1]]) for top in tops_t for e in top)
    # streamed chunks follow the flag too
    with http.stream("POST", "/generate", json={**body, "stream": True,
                                                 "return_text_in_logprobs": False}) as r:
        events = [line for line in r.iter_lines() if line]
    last = json.loads(events[-2][len("data: "):])
    assert [e[:2] for e in last["meta_info"]["output_token_logprobs"]] == [
        e[:2] for e in meta_t["output_token_logprobs"]]
    assert all(e[2] is None for e in last["meta_info"]["output_token_logprobs"])
    bad = http.post("/generate", json={**body, "return_text_in_logprobs": "yes"})
    assert bad.status_code == 400 and _error(bad)["param"] == "return_text_in_logprobs"


def test_tokenize_detokenize_round_trip(http, tokenizer):
    text = "Hello, radix tree!"
    out = http.post("/tokenize", json={"prompt": text}).json()
    assert out["tokens"] == tokenizer.encode(text) and out["count"] == len(out["tokens"])
    back = http.post("/detokenize", json={"tokens": out["tokens"],
                                          "skip_special_tokens": True}).json()
    assert back["text"] == text
    messages = [{"role": "user", "content": "hi"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


# ---- constrained decoding -----------------------------------------------------------------


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                     "maximum": 9},
                                               "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json"}], temperature=0,
        max_tokens=64, response_format={"type": "json_schema",
                                        "json_schema": {"name": "t", "schema": schema}})
    import jsonschema

    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_native_regex_and_choices(http):
    r = http.post("/generate", json={"text": "code:", "sampling_params": {
        "regex": "[0-9]{3}", "max_new_tokens": 8, "temperature": 1.0, "seed": 1}})
    assert r.status_code == 200, r.text
    assert re.fullmatch("[0-9]{3}", r.json()["text"])
    r = http.post("/generate", json={"text": "answer:", "sampling_params": {
        "choices": ["yes", "no"], "max_new_tokens": 8, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["text"] in ("yes", "no")


def test_invalid_grammar_is_a_400_even_when_streaming(http, client):
    for stream in (False, True):
        r = http.post("/generate", json={"text": "x", "stream": stream, "sampling_params": {
            "regex": "([0-9", "max_new_tokens": 4}})
        assert r.status_code == 400, r.text
        assert _error(r)["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True,
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "no-such-type"}}})


# ---- errors -------------------------------------------------------------------------------


def test_prompt_longer_than_context(client, info):
    limit = info["context_length"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[5] * (limit + 10), max_tokens=1)
    assert err.value.status_code == 400
    assert (f"maximum context length is {limit} tokens; your request has {limit + 10} input "
            "tokens") in err.value.message


def test_prompt_plus_max_tokens_over_context(client, info):
    limit = info["context_length"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[5] * (limit - 10), max_tokens=100)
    assert err.value.body["param"] == "max_tokens"
    assert f"maximum context length is {limit} tokens" in err.value.message


@pytest.mark.parametrize("field, value, param", [
    ("temperature", -1.0, "temperature"), ("top_p", 1.5, "top_p"),
    ("frequency_penalty", 3.0, "frequency_penalty"), ("max_tokens", -1, "max_tokens"),
    ("seed", -5, "seed"), ("logit_bias", {"999999": 1}, "logit_bias"), ("n", 0, "n"),
    ("top_logprobs", 50, "top_logprobs"),
])
def test_invalid_sampling_values_name_the_field(client, field, value, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       **{field: value})
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"


def test_bad_token_ids_and_budget_name_the_field_the_caller_used(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[999999], max_tokens=1)
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=-1)
    assert err.value.body["param"] == "max_completion_tokens"


def test_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=1)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_malformed_json_wrong_types_and_unknown_routes(http):
    err = _error(r := http.post("/v1/completions", content=b'{"prompt": "x",',
                                headers={"content-type": "application/json"}))
    assert r.status_code == 400 and "malformed JSON" in err["message"]
    err = _error(r := http.post("/v1/chat/completions", json={"messages": "hi"}))
    assert r.status_code == 400 and err["param"].startswith("messages")
    err = _error(r := http.post("/generate", json={"text": "x", "bogus": 1}))
    assert r.status_code == 400 and err["param"] == "bogus"
    err = _error(r := http.post("/generate", json={"text": "x", "input_ids": [1]}))
    assert r.status_code == 400
    err = _error(r := http.post("/generate", json={"text": "x", "sampling_params": {
        "temprature": 0.5}}))
    assert r.status_code == 400 and err["param"] == "temprature"
    err = _error(r := http.get("/v2/nothing"))
    assert r.status_code == 404 and err["type"] == "not_found_error"
    assert http.get("/v1/completions").status_code == 405
    err = _error(r := http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}))
    assert r.status_code == 400 and err["param"] == "tools"
    err = _error(r := http.post("/v1/chat/completions", json={
        "messages": [{"role": "tool", "content": "x"}]}))
    assert r.status_code == 400 and err["param"] == "messages"


def test_queue_full_is_429_and_leaves_the_server_healthy(http, client):
    capacity = MAX_RUNNING + MAX_QUEUED
    r = http.post("/generate", json={"text": "x", "sampling_params": {
        "n": capacity + 1, "max_new_tokens": 4}})
    err = _error(r)
    assert r.status_code == 429 and err["code"] == "queue_full"
    assert int(r.headers["Retry-After"]) >= 1
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices
    _assert_no_kv_leak(http)


def test_bad_request_does_not_disturb_a_running_one(server, client):
    results = {}

    def good():
        results["good"] = client.completions.create(model=MODEL, prompt="steady", temperature=0,
                                                    max_tokens=40, extra_body={
                                                        "ignore_eos": True})

    thread = threading.Thread(target=good)
    thread.start()
    for _ in range(5):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="x", temperature=-3)
    thread.join()
    assert results["good"].usage.completion_tokens == 40
    assert results["good"].choices[0].finish_reason == "length"


# ---- aborts -------------------------------------------------------------------------------


def test_stream_disconnect_aborts_and_frees_kv(server, http):
    body = {"text": "long", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/generate", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
    info = _wait_idle(http, timeout=15)
    assert info["running_requests"] == 0
    _assert_no_kv_leak(http)


def test_non_stream_disconnect_aborts(server, http):
    body = {"model": MODEL, "prompt": "long", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    _wait_idle(http, timeout=15)
    _assert_no_kv_leak(http)


def test_abort_route_finishes_the_request(server, http):
    result = {}

    def run():
        result["out"] = httpx.post(server.url + "/generate", timeout=60, json={
            "text": "abort me", "rid": "abort-me",
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}).json()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while http.get("/server_info").json()["running_requests"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert http.post("/abort", json={"rid": "abort-me"}).json()["success"] is True
    thread.join(30)
    finish = result["out"]["meta_info"]["finish_reason"]
    assert finish["type"] == "abort"
    assert result["out"]["meta_info"]["completion_tokens"] < 3000
    _assert_no_kv_leak(http)


# ---- metrics ------------------------------------------------------------------------------


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_metrics_exposition(client, http):
    before = http.get("/metrics").text
    out = client.completions.create(model=MODEL, prompt="count me", max_tokens=5,
                                    temperature=0, extra_body={"ignore_eos": True})
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    generated = "radixlm_generation_tokens_total"
    assert _sample(text, generated) - _sample(before, generated) == 5
    assert (_sample(text, "radixlm_prompt_tokens_total")
            - _sample(before, "radixlm_prompt_tokens_total")) == out.usage.prompt_tokens
    for name in ("radixlm_num_running_requests", "radixlm_num_waiting_requests",
                 "radixlm_kv_cache_usage_ratio", "radixlm_cache_hit_rate",
                 "radixlm_time_to_first_token_seconds_count",
                 "radixlm_inter_token_latency_seconds_count",
                 "radixlm_e2e_request_latency_seconds_count"):
        _sample(text, name)
    assert _sample(text, "radixlm_kv_cache_capacity_tokens") > 0
    assert _sample(text, "radixlm_e2e_request_latency_seconds_count") >= 1
