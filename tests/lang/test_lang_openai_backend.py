"""The OpenAI-compatible backend against radixlm's own /v1 routes (a real server, slow)."""

from __future__ import annotations

import pytest
from test_lang_acceptance import (
    SELECT_CHOICES,
    SELECT_PREFIX,
    chat_prompt,
    expected_choice,
    hf_choice_logprobs,
    reference,
)

import radixlm_lang as rl
from radixlm_lang.backends.runtime_endpoint import server_argv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def openai_backend(server_runtime, engine):
    backend = rl.OpenAI(base_url=server_runtime.url + "/v1", model=engine.model_name)
    yield backend
    backend.shutdown()


def test_text_completion_and_chat(openai_backend, engine):
    @rl.function
    def program(s):
        s += "Once upon a time" + rl.gen("story", max_tokens=6)
        s += rl.system("Be brief.") + rl.user("Hello!")
        s += rl.assistant(rl.gen("reply", max_tokens=6))

    state = program.run(backend=openai_backend, temperature=0)
    assert state.error() is None
    assert state["story"] == reference(engine, "Once upon a time", max_new_tokens=6)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert state["reply"] == reference(engine, chat_prompt(engine.tokenizer, messages),
                                       max_new_tokens=6)  # fmt: skip
    assert state.get_meta_info("reply")["prompt_tokens"] > 0


def test_streaming_through_completions(openai_backend, engine):
    @rl.function
    def program(s):
        s += "The river" + rl.gen("more", max_tokens=8)

    state = program.run(backend=openai_backend, stream=True, temperature=0)
    pieces = list(state.text_iter("more"))
    assert state.error() is None and "".join(pieces) == state["more"]
    assert state["more"] == reference(engine, "The river", max_new_tokens=8)
    assert state.get_meta_info("more")["finish_reason"]["type"] == "length"


def test_select_uses_echoed_prompt_logprobs(openai_backend, engine, hf_model):
    @rl.function
    def pick(s):
        s += SELECT_PREFIX + rl.select("w", SELECT_CHOICES)

    state = pick.run(backend=openai_backend)
    assert state.error() is None
    cond = [hf_choice_logprobs(hf_model, engine.tokenizer, SELECT_PREFIX, c)
            for c in SELECT_CHOICES]  # fmt: skip
    index, _ = expected_choice(rl.token_length_normalized, cond, None)
    assert state["w"] == SELECT_CHOICES[index]


def test_partial_assistant_message_is_a_clear_error(openai_backend):
    @rl.function
    def program(s):
        s += rl.user("Hi") + rl.assistant("Sure, " + rl.gen("x", max_tokens=3))

    assert "partially written assistant message" in str(program.run(backend=openai_backend).error())


def test_server_errors_are_reported(openai_backend):
    @rl.function
    def program(s):
        s += "x" + rl.gen("x", max_tokens=3, top_p=2.0)

    error = program.run(backend=openai_backend).error()
    assert isinstance(error, rl.BackendError) and error.status == 400


def test_server_argv():
    argv = server_argv({"model": None, "page_size": 16, "enable_radix_cache": False,
                        "schedule_policy": "dfs-weight", "api_key": "k"})  # fmt: skip
    assert argv == ["--page-size", "16", "--no-enable-radix-cache", "--schedule-policy",
                    "dfs-weight", "--api-key", "k"]  # fmt: skip
