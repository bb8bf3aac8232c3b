"""Engine results -> OpenAI response objects (pure functions, hand-computed expectations)."""

from __future__ import annotations

import json
import math

from radixlm.server.common import dumps
from radixlm.server.openai_api import (
    Plan,
    _chat_deltas,
    _completion_deltas,
    _StreamTracker,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    usage,
)
from radixlm.server.protocol import ChatCompletionRequest, CompletionRequest
from radixlm.server.runner import Job


def _meta(prompt=3, completion=2, cached=0, finish="stop", **extra):
    reason = None if finish is None else {"type": finish, "matched": "\n" if finish == "stop"
                                          else None}
    return {"id": "r", "prompt_tokens": prompt, "completion_tokens": completion,
            "cached_tokens": cached, "finish_reason": reason, **extra}


LOGPROB_META = _meta(
    input_token_logprobs=[(None, 1, "<s>"), (-1.5, 20, "Hi")],
    input_top_logprobs=[None, [(-1.5, 20, "Hi"), (-2.0, 21, "Yo")]],
    output_token_logprobs=[(-0.5, 30, " the"), (-0.25, 31, "ré")],
    output_top_logprobs=[[(-0.5, 30, " the"), (-1.0, 32, " a")],
                         [(-0.25, 31, "ré"), (-3.0, 33, "x")]],
)


def test_legacy_logprobs_without_echo_start_after_the_prompt():
    out = completion_logprobs(LOGPROB_META, echo=False, prompt_chars=5)
    assert out == {"tokens": [" the", "ré"], "token_logprobs": [-0.5, -0.25],
                   "top_logprobs": [{" the": -0.5, " a": -1.0}, {"ré": -0.25, "x": -3.0}],
                   "text_offset": [5, 9]}


def test_legacy_logprobs_with_echo_include_the_prompt():
    out = completion_logprobs(LOGPROB_META, echo=True, prompt_chars=5)
    # the first prompt token has no logprob (no context): left out, its offset kept
    assert out["tokens"] == ["Hi", " the", "ré"]
    assert out["token_logprobs"] == [-1.5, -0.5, -0.25]
    assert out["top_logprobs"][0] == {"Hi": -1.5, "Yo": -2.0}
    assert out["text_offset"] == [3, 5, 9]  # prompt from 0, output after the prompt text


# A constrained output: token 41 was sampled, 42 and 43 were forced by the grammar
# (jump-forward: no logprob), and the grammar masked "x" (-inf) out of the alternatives.
FORCED_META = _meta(
    output_token_logprobs=[(-0.5, 41, '{"'), (None, 42, "a"), (None, 43, '":'), (-0.1, 44, "1")],
    output_top_logprobs=[[(-0.5, 41, '{"'), (float("-inf"), 45, "x")], [], [],
                         [(-0.1, 44, "1"), (-2.5, 46, "2"), (float("-inf"), 45, "x")]],
)


def test_forced_and_masked_tokens_leave_no_null_in_legacy_logprobs():
    out = completion_logprobs(FORCED_META, echo=False, prompt_chars=0)
    assert out == {"tokens": ['{"', "1"], "token_logprobs": [-0.5, -0.1],
                   "top_logprobs": [{'{"': -0.5}, {"1": -0.1, "2": -2.5}],
                   "text_offset": [0, 5]}  # "1" starts after '{"a":' (5 characters)
    assert "null" not in json.dumps(out) and "Infinity" not in json.dumps(out)


def test_forced_and_masked_tokens_leave_no_null_in_chat_logprobs():
    content = chat_logprobs(FORCED_META)["content"]
    assert [(e["token"], e["logprob"]) for e in content] == [('{"', -0.5), ("1", -0.1)]
    assert [[t["token"] for t in e["top_logprobs"]] for e in content] == [['{"'], ["1", "2"]]
    assert chat_logprobs(FORCED_META, start=1)["content"] == content[1:]


def test_chat_logprobs_have_bytes_and_alternatives():
    out = chat_logprobs(LOGPROB_META)
    first, second = out["content"]
    assert first == {"token": " the", "logprob": -0.5, "bytes": [32, 116, 104, 101],
                     "top_logprobs": [{"token": " the", "logprob": -0.5,
                                       "bytes": [32, 116, 104, 101]},
                                      {"token": " a", "logprob": -1.0, "bytes": [32, 97]}]}
    assert second["bytes"] == [114, 0xC3, 0xA9]
    assert chat_logprobs(LOGPROB_META, start=1)["content"] == [second]


def test_usage_counts_each_prompt_once():
    results = [{"meta_info": _meta(prompt=10, completion=4, cached=0)},
               {"meta_info": _meta(prompt=10, completion=6, cached=10)},
               {"meta_info": _meta(prompt=7, completion=1, cached=3)},
               {"meta_info": _meta(prompt=7, completion=2, cached=7)}]
    assert usage(results, n=2) == {"prompt_tokens": 17, "completion_tokens": 13,
                                   "total_tokens": 30, "prompt_tokens_details": {
                                       "cached_tokens": 3}}


def _plan(prompts=("ab",), n=1) -> Plan:
    jobs = [Job(f"r{i}", "g") for i in range(len(prompts) * n)]
    return Plan("cmpl-x", jobs, [[1]] * len(prompts), list(prompts), n)


def test_completion_response_shape_with_echo():
    plan = _plan(prompts=("Hi", "Yo"), n=1)
    results = [{"text": " there", "meta_info": _meta(finish="stop")},
               {"text": "!", "meta_info": _meta(finish="length")}]
    out = completion_response(plan, results, "m", echo=True, logprobs=None)
    assert out["object"] == "text_completion" and out["model"] == "m"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == [
        (0, "Hi there", "stop"), (1, "Yo!", "length")]
    assert out["choices"][0]["matched_stop"] == "\n"


def test_chat_response_shape():
    plan = Plan("chatcmpl-x", [Job("a", "g"), Job("b", "g")], [[1, 2]], n=2)
    results = [{"text": "one", "meta_info": _meta()}, {"text": "two", "meta_info": _meta()}]
    out = chat_response(plan, results, "m", logprobs=False)
    assert [c["message"] for c in out["choices"]] == [
        {"role": "assistant", "content": "one"}, {"role": "assistant", "content": "two"}]
    assert out["usage"]["prompt_tokens"] == 3 and out["usage"]["completion_tokens"] == 4


def _chunks(deltas: list[str], lps: list[tuple]) -> list[dict]:
    """Cumulative engine stream chunks, the last one finished."""
    out = []
    for i, delta in enumerate(deltas):
        last = i == len(deltas) - 1
        meta = _meta(finish="stop" if last else None,
                     output_token_logprobs=lps[: i + 1], output_top_logprobs=[None] * (i + 1))
        out.append({"text": "".join(deltas[: i + 1]), "delta": delta, "meta_info": meta})
    return out


def test_chat_stream_deltas_role_content_finish():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True)
    tracker = _StreamTracker(1)
    lps = [(-0.1, 5, "Hel"), (-0.2, 6, "lo")]
    choices = [c for chunk in _chunks(["Hel", "lo"], lps)
               for c in _chat_deltas(body, tracker, 0, chunk)]
    assert [c["delta"] for c in choices] == [{"role": "assistant", "content": ""},
                                             {"content": "Hel"}, {"content": "lo"}, {}]
    assert [c["finish_reason"] for c in choices] == [None, None, None, "stop"]
    sent = [e["token"] for c in choices if c["logprobs"] for e in c["logprobs"]["content"]]
    assert sent == ["Hel", "lo"]  # each token's logprob sent exactly once


def test_completion_stream_echo_and_offsets():
    body = CompletionRequest(prompt="Hi", echo=True, logprobs=0)
    tracker = _StreamTracker(1)
    plan = _plan(prompts=("Hi",))
    lps = [(-0.1, 5, " a"), (-0.2, 6, "bc")]
    choices = [c for chunk in _chunks([" a", "bc"], lps)
               for c in _completion_deltas(plan, body, tracker, 0, chunk)]
    assert "".join(c["text"] for c in choices) == "Hi abc"
    offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
    tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
    assert tokens == [" a", "bc"] and offsets == [2, 4]
    assert choices[-1]["finish_reason"] == "stop"


def test_json_output_never_contains_infinity():
    text = dumps({"logprob": -math.inf, "ok": 1.5, "nested": [(math.nan, 1)]})
    assert json.loads(text) == {"logprob": None, "ok": 1.5, "nested": [[None, 1]]}
