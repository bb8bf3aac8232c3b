"""Constrained decoding through the engine core with tiny random models (both tokenizers)."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest

from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import EngineCore
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tier": {"enum": ["gold", "silver", "bronze"]},
    },
    "required": ["name", "age", "member", "tier"],
    "additionalProperties": False,
}
EMAIL = r"[a-z]{1,6}@(example|test)\.(com|org)"


def make_core(model_dir, **kwargs) -> EngineCore:
    return EngineCore(EngineConfig.from_kwargs(model=str(model_dir), kv_cache_tokens=8192,
                                               **kwargs), progress=False)


def run(core: EngineCore, requests: dict[str, dict], prompt: list[int]) -> dict[str, dict]:
    done: dict[str, dict] = {}
    for rid, params in requests.items():
        core.add_request(ipc.AddRequest(rid, prompt, SamplingParams(**params), LogprobOptions()))
        done[rid] = {"ids": [], "finish": None, "jump": 0}
    deadline = time.monotonic() + 240
    while core.has_work():
        assert time.monotonic() < deadline, "constrained requests did not finish"
        for out in core.step():
            done[out.rid]["ids"].extend(out.new_token_ids)
            done[out.rid]["jump"] = out.jump_forward_tokens
            if out.finish is not None:
                done[out.rid]["finish"] = out.finish
        core.check_invariants()
    return done


def text_of(core: EngineCore, ids: list[int]) -> str:
    return core.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module", params=[True, False], ids=["overlap", "serial"])
def overlap(request) -> bool:
    """Constrained rows make the overlap loop drain; both loops must give valid outputs."""
    return request.param


@pytest.fixture(scope="module")
def core3(tiny_llama3_dir, overlap):
    return make_core(tiny_llama3_dir, enable_overlap=overlap)


@pytest.fixture(scope="module")
def core2(tiny_llama2_dir, overlap):
    return make_core(tiny_llama2_dir, enable_overlap=overlap)


@pytest.mark.parametrize("which", ["core3", "core2"])
def test_json_schema_outputs_parse_and_validate(which, request, overlap):
    core = request.getfixturevalue(which)
    prompt = core.tokenizer.encode("Give me a person as JSON:")
    reqs = {f"j{i}": {"max_new_tokens": 80, "temperature": 1.0, "seed": i,
                      "json_schema": json.dumps(PERSON)} for i in range(6)}
    results = run(core, reqs, prompt)
    finished = 0
    for rid, res in results.items():
        text = text_of(core, res["ids"])
        if res["finish"].kind.value == "stop":
            jsonschema.validate(json.loads(text), PERSON)
            finished += 1
        else:
            assert res["finish"].kind.value == "length", (rid, res["finish"])
    assert finished >= 4, "bounded schema should usually complete within 80 tokens"
    assert any(r["jump"] > 0 for r in results.values()), "fixed keys are jump-forwarded"


@pytest.mark.parametrize("which", ["core3", "core2"])
def test_regex_and_choices(which, request, overlap):
    core = request.getfixturevalue(which)
    prompt = core.tokenizer.encode("Contact:")
    reqs = {f"r{i}": {"max_new_tokens": 40, "temperature": 1.0, "seed": i, "regex": EMAIL}
            for i in range(4)}
    choices = ["alpha", "beta gamma", "delta"]
    reqs.update({f"c{i}": {"max_new_tokens": 20, "temperature": 1.0, "seed": 10 + i,
                           "choices": choices} for i in range(4)})
    results = run(core, reqs, prompt)
    for rid, res in results.items():
        assert res["finish"].kind.value == "stop", (rid, res["finish"])
        text = text_of(core, res["ids"])
        if rid.startswith("r"):
            assert re.fullmatch(EMAIL, text), text
        else:
            assert text in choices, text


def test_constraint_with_n_parallel_samples_and_unconstrained_neighbours(core3):
    prompt = core3.tokenizer.encode("Mixed batch")
    reqs = {"free": {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True},
            "rx": {"max_new_tokens": 30, "temperature": 0.0, "regex": r"(yes|no)( again)?"}}
    results = run(core3, reqs, prompt)
    assert len(results["free"]["ids"]) == 12
    assert re.fullmatch(r"(yes|no)( again)?", text_of(core3, results["rx"]["ids"]))


def test_invalid_schema_fails_that_request_only(core3):
    prompt = core3.tokenizer.encode("x")
    reqs = {"bad": {"max_new_tokens": 8, "json_schema": json.dumps({"type": "nonsense"})},
            "good": {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}}
    results = run(core3, reqs, prompt)
    assert results["bad"]["finish"].kind.value == "abort"
    assert "invalid constraint" in results["bad"]["finish"].message
    assert len(results["good"]["ids"]) == 4


def test_unconstrained_request_streams_while_a_slow_schema_compiles(core3, monkeypatch):
    """Compilation runs off the loop: a plain request finishes while a grammar compiles.

    The compile is held back for two seconds (a real compile with the default backend takes
    milliseconds), so the test does not depend on any backend's speed.
    """
    import threading
    from concurrent.futures import Future

    real_submit = core3.grammar.compiler.submit

    def slow_submit(kind, spec):
        compiled = real_submit(kind, spec)
        delayed: Future = Future()
        threading.Timer(2.0, lambda: delayed.set_result(compiled.result())).start()
        return delayed

    monkeypatch.setattr(core3.grammar.compiler, "submit", slow_submit)
    prompt = core3.tokenizer.encode("timing")
    core3.add_request(ipc.AddRequest("slow", prompt, SamplingParams(
        max_new_tokens=1, json_schema=json.dumps(PERSON))))
    core3.add_request(ipc.AddRequest("fast", prompt, SamplingParams(
        max_new_tokens=16, temperature=0.0, ignore_eos=True)))
    fast_done = slow_done = None
    start = time.monotonic()
    while core3.has_work() and time.monotonic() - start < 240:
        for out in core3.step():
            if out.finish is not None and out.rid == "fast":
                fast_done = time.monotonic() - start
            if out.finish is not None and out.rid == "slow":
                slow_done = time.monotonic() - start
    assert fast_done is not None and slow_done is not None
    assert fast_done < 2.0 <= slow_done, (fast_done, slow_done)


@pytest.mark.slow
def test_jump_forward_leaves_the_models_own_token_boundary(smollm2_engine):
    """SmolLM2 spells ``{"colours": ["red"`` with `` ["``. Splicing ``{"colours": [`` as tokens
    ending in `` [`` took that token away, and the model answered ``"./I/painted/..."``; with
    the splice healed it names the colour, as it does without jump-forward."""
    schema = {"type": "object", "required": ["colours"], "properties": {
        "colours": {"type": "array", "items": {"type": "string"}}}}
    question = "I painted the fence red. Which colours did I use? Answer in JSON."
    prompt = smollm2_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    out = smollm2_engine.generate(prompt, {"max_new_tokens": 12, "temperature": 0.0,
                                           "json_schema": json.dumps(schema)})
    assert out["text"].startswith('{"colours": ["red"'), out["text"]
    assert out["meta_info"]["jump_forward_tokens"] > 0


def test_stop_string_inside_jump_forward_text_finishes(core3):
    """`"age"` is a fixed key of the schema, so jump-forward splices it in without sampling."""
    prompt = core3.tokenizer.encode("Give me a person as JSON:")
    reqs = {f"s{i}": {"max_new_tokens": 80, "temperature": 1.0, "seed": i, "stop": ['"age"'],
                      "json_schema": json.dumps(PERSON)} for i in range(3)}
    results = run(core3, reqs, prompt)
    for rid, res in results.items():
        finish = res["finish"]
        text = text_of(core3, res["ids"])
        if finish.kind.value == "length":
            assert '"age"' not in text, rid
            continue
        assert finish.kind.value == "stop" and finish.matched == '"age"', (rid, finish)
        # generation ends with the splice that spelled the key; the frontend cuts its text
        assert text.count('"age"') == 1 and len(text.split('"age"')[1]) <= 2, (rid, text)
        assert res["jump"] > 0, rid
