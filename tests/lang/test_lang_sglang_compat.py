"""SGLang's frontend API, item by item (issue 15), on a scripted backend.

Each test states what SGLang's frontend does (``python/sglang/lang/`` and ``sglang/api.py``)
and checks radixlm_lang does the same. The real-model programs in ``sglang_style/`` run the same
features end to end against the default model.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from conftest import ScriptedBackend, scripted_completion

import radixlm_lang as sgl
from radixlm_lang.backends.base import Completion, StreamDelta
from radixlm_lang.reasoning import split_reasoning
from radixlm_lang.server_args import translate_server_args


@pytest.fixture
def default_backend(scripted):
    sgl.set_default_backend(scripted)
    yield scripted
    sgl.set_default_backend(None)


# ---- 1. calling a program without a state ---------------------------------------------------


def test_calling_a_program_at_top_level_runs_it_on_the_default_backend(default_backend):
    # SGLang: SglFunction.__call__ outside tracing is self.run(*args, **kwargs).
    @sgl.function
    def qa(s, question):
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=3)

    state = qa(question="why?", temperature=0)
    assert isinstance(state, sgl.ProgramState)
    assert state["answer"] == scripted_completion("Q: why?\nA:", 3)
    assert default_backend.requests[0][2].temperature == 0


def test_appending_a_call_runs_the_sub_program_on_the_state(default_backend):
    @sgl.function
    def ask(s, question):
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=2)

    @sgl.function
    def main(s):
        s += "Context.\n"
        s += ask(question="one")
        s += "\n" + ask(question="two") + "\nEnd."

    state = main.run()
    first = scripted_completion("Context.\nQ: one\nA:", 2)
    prefix = f"Context.\nQ: one\nA:{first}\nQ: two\nA:"
    assert state.text() == prefix + scripted_completion(prefix, 2) + "\nEnd."
    assert state["answer"] == scripted_completion(prefix, 2)


def test_a_call_read_as_a_state_runs_the_program_on_its_own(scripted):
    # SGLang: inside a program, sub(...) is sub.run(...): a separate program and its state.
    @sgl.function
    def ask(s, question):
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=2)

    @sgl.function
    def main(s):
        s += "Context.\n"
        separate = ask(question="one")
        s += "Heard: " + separate["answer"]

    state = main.run(backend=scripted)  # the enclosing run's backend serves the call
    assert state.text() == "Context.\nHeard: " + scripted_completion("Q: one\nA:", 2)


def test_a_call_inside_a_program_takes_no_generation_defaults(default_backend):
    @sgl.function
    def sub(s):
        s += "x"

    @sgl.function
    def main(s):
        s += sub(temperature=0)

    with pytest.raises(TypeError, match="only its own arguments"):
        main.run()


def test_bind_fixes_arguments(default_backend):
    @sgl.function
    def greet(s, greeting, name):
        s += greeting + ", " + name

    assert greet.bind(greeting="Hi").run(name="Ada").text() == "Hi, Ada"
    with pytest.raises(TypeError, match="no parameters"):
        greet.bind(nope=1)


# ---- 2. fork: lambdas, per-branch lists, SGLang's join modes ------------------------------------


def test_forks_take_a_lambda_a_list_and_join_concate_and_append(scripted):
    # SGLang: ProgramStateGroup.__iadd__ calls a callable with the branch index, indexes a list.
    @sgl.function
    def program(s, contexts):
        s += "Facts:\n"
        forks = s.fork(len(contexts))
        forks += lambda i: f"{i}: " + contexts[i]
        forks += ["!\n", "?\n", ".\n"]
        forks.join(mode="concate_and_append")
        s += "Done"

    state = program.run(["a", "b", "c"], backend=scripted)
    assert state.text() == "Facts:\n0: a!\n1: b?\n2: c.\nDone"


def test_join_gather_variable_collects_lists(scripted):
    @sgl.function
    def program(s):
        forks = s.fork(2)
        forks += lambda i: f"branch {i}:" + sgl.gen("x", max_tokens=2)
        forks.join("gather_variable")

    state = program.run(backend=scripted)
    assert state["x"] == [scripted_completion(f"branch {i}:", 2) for i in range(2)]


def test_fork_list_of_the_wrong_length_and_unknown_join_modes_are_refused(scripted):
    @sgl.function
    def wrong_length(s):
        s.fork(2).__iadd__(["only one"])

    with pytest.raises(ValueError, match="1 items for 2 fork branches"):
        wrong_length.run(backend=scripted)

    @sgl.function
    def bad_mode(s):
        s.fork(2).join("merge")

    with pytest.raises(ValueError, match="join mode must be one of"):
        bad_mode.run(backend=scripted)


# ---- 3. text_iter(var_name=...), text_async_iter(var_name=..., return_meta_data=True) ---------


def test_text_iter_and_text_async_iter_take_var_name_and_return_meta_data(scripted):
    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("answer", max_tokens=4)

    state = program.run(backend=scripted, stream=True)
    assert "".join(state.text_iter(var_name="answer")) == scripted_completion("Q:", 4)

    async def collect():
        streamed = program.run(backend=scripted, stream=True)
        return [item async for item in streamed.text_async_iter("answer", return_meta_data=True)]

    items = asyncio.run(collect())
    assert "".join(piece for piece, _ in items) == scripted_completion("Q:", 4)
    assert items[-1][1]["finish_reason"] == {"type": "length"}  # the final meta_info


# ---- 4. select's meta_info in SGLang's shapes ----------------------------------------------------


def test_select_meta_info_has_sglang_keys(make_scripted):
    backend = make_scripted(choice_logprobs={"yes": [-0.1, -0.3], "no": [-2.0]})

    @sgl.function
    def program(s):
        s += "Answer:" + sgl.select("a", ["yes", "no"])

    meta = program.run(backend=backend).get_meta_info("a")
    assert meta["normalized_prompt_logprobs"] == pytest.approx([-0.2, -2.0])
    # per choice: one [logprob, token id, token text] entry per token of the choice
    assert [[e[0] for e in row] for row in meta["input_token_logprobs"]] == [[-0.1, -0.3], [-2.0]]
    assert all(len(e) == 3 for row in meta["input_token_logprobs"] for e in row)
    assert meta["output_token_logprobs"] == [[], []]  # scoring generates no tokens


# ---- 5. gen's and select's signatures ---------------------------------------------------------


def test_gen_positional_arguments_follow_sglang_order():
    # SGLang: gen(name, max_tokens, min_tokens, n, stop, stop_token_ids, stop_regex, ...)
    expr = sgl.gen("x", 16, 2, 3, "\n", [7], r"\d")
    params = expr.params
    assert (params.max_new_tokens, params.min_new_tokens, params.n) == (16, 2, 3)
    assert params.stop == ("\n",) and params.stop_token_ids == (7,)
    assert params.stop_regex == (r"\d",)
    # gen_int/gen_string: (name, max_tokens, n, stop, ...)
    assert sgl.gen_int("i", 4, 1, " ").params.stop == (" ",)
    with pytest.raises(re.error):
        sgl.gen("x", regex="(")


def test_gen_n_stores_every_sample_and_continues_with_the_first(make_scripted):
    samples = iter(["alpha", "beta", "gamma"])
    backend = make_scripted(complete=lambda prompt, n: next(samples))

    @sgl.function
    def program(s):
        s += "Word:" + sgl.gen("w", n=3, max_tokens=2, seed=5)

    state = program.run(backend=backend)
    assert state["w"] == ["alpha", "beta", "gamma"] and state.text() == "Word:alpha"
    assert [r[2].seed for r in backend.requests] == [5, 6, 7]  # one seed per sample


class _StreamingBackend(ScriptedBackend):
    """Streams a fixed text in pieces and records whether the stream was closed early."""

    def __init__(self, pieces):
        super().__init__()
        self.pieces, self.closed_early = pieces, False

    def generate_stream(self, prompt, params, messages=None):
        try:
            for i, piece in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                yield StreamDelta(piece, {"finish_reason": {"type": "length"}} if last else None)
        except GeneratorExit:
            self.closed_early = True
            raise


def test_stop_regex_cuts_at_the_first_match_and_stops_the_stream():
    backend = _StreamingBackend(["Order 1", "2 items", " total", " now"])

    @sgl.function
    def program(s):
        s += sgl.gen("x", stop_regex=r"\d+ items?")

    state = program.run(backend=backend)
    assert state["x"] == "Order " and state.text() == "Order "
    assert state.get_meta_info("x")["finish_reason"] == {"type": "stop", "matched": "12 items"}
    assert backend.closed_early


def test_return_text_in_logprobs_fills_token_texts(make_scripted):
    backend = make_scripted()
    meta = {"output_token_logprobs": [[-0.5, 11], [-0.1, 12, None]], "finish_reason": None}
    backend.generate = lambda prompt, params, messages=None: Completion("ab", meta)
    backend.token_texts = lambda ids: [f"<{i}>" for i in ids]

    @sgl.function
    def program(s):
        s += sgl.gen("x", return_logprob=True, return_text_in_logprobs=True)

    out = program.run(backend=backend).get_meta_info("x")["output_token_logprobs"]
    assert out == [[-0.5, 11, "<11>"], [-0.1, 12, "<12>"]]


def test_max_tokens_zero_with_top_logprobs_reports_the_next_token_distribution(make_scripted):
    # SGLang's cot_decoding example: gen(max_tokens=0, return_logprob=True, top_logprobs_num=k)
    # then get_meta_info(...)["output_top_logprobs"][0] holds the k likeliest next tokens.
    backend = make_scripted()
    top = [[-0.1, 5, " a"], [-2.0, 6, " b"]]
    meta = {"output_top_logprobs": [top], "output_token_logprobs": [[-0.1, 5, " a"]]}
    backend.generate = lambda prompt, params, messages=None: (
        backend.requests.append(("generate", prompt, params)) or Completion(" a", meta)
    )

    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("k", max_tokens=0, return_logprob=True, top_logprobs_num=2)

    state = program.run(backend=backend)
    out = state.get_meta_info("k")
    assert state["k"] == "" and state.text() == "Q:"
    assert out["output_top_logprobs"] == [top] and out["output_token_logprobs"] == []
    sent = backend.requests[0][2]
    assert sent.max_new_tokens == 1 and sent.temperature == 0.0 and sent.top_logprobs_num == 2


def test_select_takes_temperature_positionally_and_only_zero():
    # SGLang: select(name, choices, temperature=0.0, choices_method=...); the runtime backend
    # asserts temperature <= 1e-5.
    expr = sgl.select("a", ["x", "y"], 0.0, sgl.greedy_token_selection)
    assert expr.method is sgl.greedy_token_selection
    with pytest.raises(ValueError, match="temperature must be 0"):
        sgl.select("a", ["x", "y"], 0.7)
    assert isinstance(sgl.gen("a", choices=["x", "y"]), type(expr))


# ---- 6. backends ----------------------------------------------------------------------------


def test_sglang_server_arguments_translate_to_radixlm_options():
    options = translate_server_args(
        {
            "model_path": "/m",
            "mem_fraction_static": 0.5,
            "max_total_tokens": 4096,
            "disable_radix_cache": True,
            "disable_cuda_graph": True,
            "disable_overlap_schedule": False,
            "trust_remote_code": True,
            "tp_size": 1,
            "dtype": "half",
            "attention_backend": "torch_native",
            "schedule_policy": "lpm",
        }
    )
    assert options == {
        "model": "/m",
        "mem_fraction": 0.5,
        "kv_cache_tokens": 4096,
        "enable_radix_cache": False,
        "cuda_graph_max_batch_size": 0,
        "dtype": "float16",
        "attention_backend": "torch",
        "schedule_policy": "lpm",
    }
    with pytest.raises(TypeError, match="'enable_lora' has no radixlm equivalent"):
        translate_server_args({"enable_lora": True})
    with pytest.raises(ValueError, match="tp_size=2"):
        translate_server_args({"tp_size": 2})
    with pytest.raises(TypeError, match="already given"):
        translate_server_args({"model_path": "/a", "model": "/b"})


def test_runtime_endpoint_takes_sglang_arguments():
    endpoint = sgl.RuntimeEndpoint("http://127.0.0.1:9", None, False)  # (base_url, api_key, verify)
    assert endpoint.base_url == "http://127.0.0.1:9"
    endpoint.shutdown()
    with pytest.raises(ValueError, match="model's own chat template"):
        sgl.RuntimeEndpoint("http://127.0.0.1:9", chat_template_name="llama-2-chat")


def test_flush_cache_and_get_server_info_without_a_backend():
    # SGLang: flush_cache() returns False and get_server_info() None when no backend is set.
    assert sgl.flush_cache() is False
    assert sgl.get_server_info() is None


def test_openai_backend_takes_sglang_argument_order(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    backend = sgl.OpenAI("gpt-x", base_url="http://127.0.0.1:9/v1")
    assert backend.model == "gpt-x" and backend.base_url == "http://127.0.0.1:9/v1"
    assert backend._client.headers["Authorization"] == "Bearer sk-env"
    assert sgl.OpenAI("m", is_chat_model=False).uses_chat_messages is False
    with pytest.raises(ValueError, match="needs the model name"):
        sgl.OpenAI()


# ---- 7. names ---------------------------------------------------------------------------------


def test_state_repr_is_sglangs(scripted):
    @sgl.function
    def program(s):
        s += "hello"

    assert repr(program.run(backend=scripted)) == "ProgramState(hello)"


def test_sglang_names_exist():
    # The constants are SGLang's own patterns (sglang/lang/ir.py).
    assert sgl.REGEX_INT == r"[-+]?[0-9]+[ \n]*"
    assert sgl.REGEX_FLOAT == r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
    assert sgl.REGEX_BOOL == r"(True|False)"
    assert sgl.REGEX_STR == r"\"[\w\d\s]*\""
    assert isinstance(sgl.__version__, str) and callable(sgl.Engine)
    for name in ("flush_cache", "get_server_info", "separate_reasoning", "global_config"):
        assert hasattr(sgl, name), name


def test_engine_is_radixlm_engine_with_sglang_argument_names(monkeypatch):
    import radixlm

    started = []
    monkeypatch.setattr(radixlm, "Engine", lambda **kwargs: started.append(kwargs) or "engine")
    assert sgl.Engine(model_path="/m", mem_fraction_static=0.5) == "engine"
    assert started == [{"model": "/m", "mem_fraction": 0.5}]


def test_global_config_default_backend_is_the_default_backend(scripted):
    sgl.global_config.default_backend = scripted
    try:
        assert sgl.get_default_backend() is scripted
    finally:
        sgl.set_default_backend(None)
    assert sgl.global_config.default_backend is None


def test_function_decorator_takes_num_api_spec_tokens(scripted):
    @sgl.function(num_api_spec_tokens=64)
    def program(s):
        s += "Name:" + sgl.gen("name", stop="\n", max_tokens=3)

    assert program.num_api_spec_tokens == 64
    assert program.run(backend=scripted)["name"] == scripted_completion("Name:", 3)


def test_copy_role_calls_with_an_argument_and_multimodal_errors(scripted):
    @sgl.function
    def program(s):
        s.system("Be brief.")
        s.user("Hi")
        with s.copy() as draft:
            draft += "draft:" + sgl.gen("d", max_tokens=2)
        s.assistant("Hello")

    state = program.run(backend=scripted)
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]
    assert len(state["d"]) == 1 and "draft:" not in state.text()
    with pytest.raises(NotImplementedError, match="multimodal input is not supported"):
        sgl.image("cat.png")
    with pytest.raises(NotImplementedError, match="multimodal input is not supported"):
        sgl.video("cat.mp4", 4)


def test_run_batch_takes_positional_argument_lists(scripted):
    # SGLang: a list of lists maps values to the function's parameters in order.
    @sgl.function
    def program(s, a, b="!"):
        s += a + b

    states = program.run_batch([["x"], ["y", "?"]], backend=scripted)
    assert [st.text() for st in states] == ["x!", "y?"]
    with pytest.raises(TypeError, match="takes 2 arguments"):
        program.run_batch([["x", "y", "z"]], backend=scripted)
    streamed = program.run_batch([["a"], ["b"]], backend=scripted, generator_style=True)
    assert not isinstance(streamed, list)
    assert [st.text() for st in streamed] == ["a!", "b!"]


@pytest.mark.parametrize(
    ("model_type", "text", "reasoning", "answer"),
    [
        (None, "<think>two plus two</think>\n\nfour", "two plus two", "four"),
        (None, "four", "", "four"),
        ("deepseek-r1", "two plus two</think>four", "two plus two", "four"),
        ("deepseek-r1", "still thinking", "still thinking", ""),
        ("qwen3", "<think>cut off", "cut off", ""),
        ("kimi_k2", "◁think▷hm◁/think▷ok", "hm", "ok"),
    ],
)
def test_split_reasoning(model_type, text, reasoning, answer):
    assert split_reasoning(text, model_type) == (reasoning, answer)


def test_separate_reasoning_sets_the_answer_and_the_reasoning_variable(make_scripted):
    backend = make_scripted(complete=lambda prompt, n: "<think>easy</think> yes")

    @sgl.function
    def program(s):
        s += "Q?" + sgl.separate_reasoning(sgl.gen("a"), model_type="qwen3")

    state = program.run(backend=backend)
    assert state["a"] == "yes" and state["a_reasoning_content"] == "easy"
    assert state.text() == "Q?<think>easy</think> yes"
    with pytest.raises(ValueError, match="unknown reasoning model_type"):
        sgl.separate_reasoning(sgl.gen("a"), model_type="gpt-9")
    with pytest.raises(TypeError, match="named gen or select"):
        sgl.separate_reasoning("text only")

    @sgl.function
    def in_a_role(s):
        s += sgl.user("Q?")
        s += sgl.assistant(sgl.separate_reasoning("Sure. " + sgl.gen("b"), model_type="qwen3"))

    # the gen's own output is split; the message keeps the whole text
    inner = in_a_role.run(backend=backend)
    assert inner["b"] == "yes" and inner["b_reasoning_content"] == "easy"
    assert inner.messages()[-1]["content"] == "Sure. <think>easy</think> yes"
    graph = program.trace()  # the tracer follows it too
    assert graph.error is None
    assert [n.kind for n in graph.nodes] == ["text", "gen", "set_var"]


# ---- 8. errors ----------------------------------------------------------------------------------


def test_backend_errors_do_not_raise_from_run(make_scripted):
    backend = make_scripted(fail_on="boom")

    @sgl.function
    def program(s):
        s += "boom" + sgl.gen("a")

    state = program.run(backend=backend)
    assert "scripted failure" in str(state.error())


# ---- 9. dtype: SGLang's regexes, raw text, extra stops ----------------------------------------


@pytest.mark.parametrize(
    ("dtype", "regex", "stops"),
    [
        (int, sgl.REGEX_INT, (" ", "\n")),
        ("float", sgl.REGEX_FLOAT, (" ", "\n")),
        (bool, sgl.REGEX_BOOL, ()),
        (str, sgl.REGEX_STR, ()),
    ],
)
def test_dtype_sends_sglang_regex_and_keeps_raw_text(make_scripted, dtype, regex, stops):
    backend = make_scripted(complete=lambda prompt, n: "raw")

    @sgl.function
    def program(s):
        s += "v=" + sgl.gen("v", dtype=dtype, stop=";")

    state = program.run(backend=backend)
    assert state["v"] == "raw"  # no conversion: SGLang keeps the generated text
    sent = backend.requests[0][2]
    assert sent.regex == regex and sent.stop == (";", *stops)
