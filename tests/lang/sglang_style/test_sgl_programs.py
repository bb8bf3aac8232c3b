"""SGLang-style programs, run unchanged against a real server and the in-process engine.

Both serve the default model, SmolLM2-135M-Instruct: ``sgl.Runtime(model_path=...)`` (a real
``radixlm serve`` on 127.0.0.1, started with SGLang's argument names) and the session's shared
SmolLM2 engine through ``sgl.EngineBackend``.

Every program below is written the way SGLang's own tests and examples write them; only the
import differs. Answers are checked where SmolLM2-135M-Instruct is reliably right under greedy
decoding (capital cities, few-shot patterns); elsewhere the checks are on structure.
"""

from __future__ import annotations

import json
import re
import time

import pytest

import radixlm_lang as sgl

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0}


@pytest.fixture(params=["server", "engine"])
def backend(request):
    """Each backend in turn (``sgl_server``/``sgl_engine`` in tests/lang/conftest.py), set as the
    default backend: the programs run with a plain ``.run()``, as SGLang programs do."""
    chosen = request.getfixturevalue("sgl_server" if request.param == "server" else "sgl_engine")
    sgl.set_default_backend(chosen)
    yield chosen
    sgl.set_default_backend(None)


# ---- text, gen, few-shot ------------------------------------------------------------------------


@sgl.function
def few_shot_qa(s, question):
    s += "The following are questions with answers.\n\n"
    s += "Q: What is the capital of Germany?\nA: Berlin\n"
    s += "Q: What is the capital of Italy?\nA: Rome\n"
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", temperature=0, max_tokens=8)


def test_few_shot_qa(backend):
    state = few_shot_qa.run(question="What is the capital of France?")
    assert state.error() is None
    assert state["answer"].strip() == "Paris"


def test_few_shot_qa_run_batch(backend):
    states = few_shot_qa.run_batch(
        [
            {"question": "What is the capital of Japan?"},
            {"question": "What is the capital of Spain?"},
        ],
        temperature=0,
    )
    assert [st["answer"].strip() for st in states] == ["Tokyo", "Madrid"]


def test_run_batch_with_positional_argument_lists(backend):
    states = few_shot_qa.run_batch([["What is the capital of Japan?"]], temperature=0)
    assert states[0]["answer"].strip() == "Tokyo"


@sgl.function
def expert_answer(s, question):
    s += "Question: " + question + "\n"
    s += "A good person to answer this question is" + sgl.gen(
        "expert", stop=[".", "\n"], max_tokens=8
    )
    s += (
        ".\nFor example,"
        + s["expert"]
        + " would answer that "
        + sgl.gen("answer", stop=".", max_tokens=8)
    )


def test_expert_answer_reads_a_variable_back_into_the_prompt(backend):
    state = expert_answer.run(question="What is the capital of France?", **GREEDY)
    assert state.error() is None
    assert f"For example,{state['expert']} would answer that " in state.text()


# ---- chat roles ---------------------------------------------------------------------------------


@sgl.function
def multi_turn_question(s, question_1, question_2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=12))
    with s.user():
        s += question_2
    with s.assistant():
        s += sgl.gen("answer_2", max_tokens=6)


def test_multi_turn_question(backend):
    state = multi_turn_question.run(
        question_1="What is the capital of France?",
        question_2="And of Italy?",
        temperature=0,
    )
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert "Paris" in state["answer_1"]
    assert messages[2]["content"] == state["answer_1"]
    assert state.text().startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


@sgl.function
def explicit_role_markers(s, question):
    s += sgl.user_begin() + question + sgl.user_end()
    s += sgl.assistant_begin() + sgl.gen("answer", max_tokens=8) + sgl.assistant_end()


def test_role_begin_and_end(backend):
    state = explicit_role_markers.run(question="What is the capital of France?", **GREEDY)
    assert [m["role"] for m in state.messages()] == ["user", "assistant"]
    assert "Paris" in state["answer"]


@sgl.function
def state_role_methods(s, question):
    s.system("Answer in one word.")
    s.user(question)
    s.assistant(sgl.gen("answer", max_tokens=10))


def test_state_role_methods_with_an_argument(backend):
    state = state_role_methods.run(question="What is the capital of France?", **GREEDY)
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]
    assert "Paris" in state["answer"]


# ---- select -------------------------------------------------------------------------------------


@sgl.function
def capital_choice(s, country, method):
    s += "Q: What is the capital of " + country + "?\nA:"
    s += sgl.select("capital", [" Paris", " Tokyo", " Madrid"], choices_method=method)


@pytest.mark.parametrize(
    "method",
    [
        sgl.token_length_normalized,
        sgl.greedy_token_selection,
        sgl.unconditional_likelihood_normalized,
    ],
    ids=lambda m: m.name,
)
def test_select_methods(backend, method):
    state = capital_choice.run(country="Japan", method=method)
    assert state["capital"] == " Tokyo"
    meta = state.get_meta_info("capital")
    assert len(meta["normalized_prompt_logprobs"]) == 3
    rows = meta["input_token_logprobs"]
    # per choice: [logprob, token id, token text]; the texts spell the choice
    assert ["".join(entry[2] for entry in row) for row in rows] == [" Paris", " Tokyo", " Madrid"]
    assert meta["output_token_logprobs"] == [[], [], []]


@sgl.function
def gen_with_choices(s):
    s += "Q: Is the sky blue on a clear day?\nA:" + sgl.gen("yes_no", choices=[" Yes", " No"])


def test_gen_with_choices_is_a_select(backend):
    state = gen_with_choices.run()
    assert state["yes_no"] in (" Yes", " No") and state.text().endswith(state["yes_no"])


@sgl.function
def react_loop(s, question):
    s += "Question: " + question + "\n"
    for i in range(1, 3):
        s += f"Thought {i}:" + sgl.gen(stop=[".", "\n"], max_tokens=8) + ".\n"
        s += f"Action {i}: " + sgl.select(f"action_{i}", ["Search", "Finish"])
        if s[f"action_{i}"] == "Search":
            s += " [" + sgl.gen(stop="]", max_tokens=6) + "].\n"
        else:
            s += " [" + sgl.gen("answer", stop="]", max_tokens=6) + "].\n"
            break


def test_react_loop_branches_on_selected_values(backend):
    state = react_loop.run(question="What is the capital of France?", **GREEDY)
    assert state.error() is None
    assert state["action_1"] in ("Search", "Finish")
    assert "Action 1: " + state["action_1"] + " [" in state.text()


# ---- constrained generation ---------------------------------------------------------------------


@sgl.function
def decode_int(s):
    s += "The number of hours in a day is " + sgl.gen_int("hours", max_tokens=4) + "\n"
    s += "The number of days in a week is " + sgl.gen_int("days", max_tokens=4) + "\n"


def test_gen_int_keeps_the_raw_digits(backend):
    state = decode_int.run(temperature=0)
    assert state.error() is None
    for name in ("hours", "days"):
        assert re.fullmatch(sgl.REGEX_INT, state[name]), state[name]
        int(state[name])  # SGLang programs convert the text themselves


@sgl.function
def dtype_gen(s):
    s += "Q: What is the value of pi?\nA: " + sgl.gen("float_res", dtype=float, max_tokens=6)
    s += "\nQ: Is the sky blue?\nA: " + sgl.gen("bool_res", dtype=bool, max_tokens=3)
    s += "\nQ: What is the capital of France?\nA: " + sgl.gen("str_res", dtype=str, max_tokens=6)


def test_dtype_gen_matches_sglang_regexes(backend):
    state = dtype_gen.run(temperature=0)
    assert state.error() is None
    assert re.fullmatch(sgl.REGEX_FLOAT, state["float_res"])
    assert state["bool_res"] in ("True", "False")
    assert re.fullmatch(sgl.REGEX_STR, state["str_res"])


IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"


@sgl.function
def regex_gen(s):
    s += "Q: What is the IP address of the Google DNS servers?\n"
    s += "A: " + sgl.gen("answer", temperature=0, regex=IP_REGEX, max_tokens=16)


def test_regex_gen(backend):
    state = regex_gen.run()
    assert re.fullmatch(IP_REGEX, state["answer"]), state["answer"]


CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "is_capital": {"type": "boolean"}},
    "required": ["name", "is_capital"],
    "additionalProperties": False,
}


@sgl.function
def json_city(s):
    s += sgl.user("Describe Paris as JSON with the keys name and is_capital.")
    s += sgl.assistant(sgl.gen("json", json_schema=json.dumps(CITY_SCHEMA), max_tokens=32))


def test_json_schema_gen(backend):
    state = json_city.run(temperature=0)
    assert state.error() is None, state.error()
    value = json.loads(state["json"])
    assert set(value) == {"name", "is_capital"} and isinstance(value["is_capital"], bool)


@sgl.function
def character_var_scope(s):
    s += "Generate a JSON object that describes a city.\n"
    with s.var_scope("json_output"):
        s += '{\n  "name": ' + sgl.gen_string(max_tokens=8) + ",\n"
        s += '  "population": ' + sgl.gen_int(max_tokens=6) + "\n}"


def test_var_scope_captures_typed_gens_as_json(backend):
    state = character_var_scope.run(temperature=0)
    assert state.error() is None
    value = json.loads(state["json_output"])
    assert isinstance(value["name"], str) and isinstance(value["population"], int)


@sgl.function
def reasoning_answer(s):
    s += "Think briefly, then answer yes or no. Is Paris in France?\n"
    s += sgl.separate_reasoning(
        sgl.gen("answer", regex=r"<think>[a-z ]{1,24}</think> (yes|no)", max_tokens=16),
        model_type="qwen3",
    )


def test_separate_reasoning(backend):
    state = reasoning_answer.run(temperature=0)
    assert state["answer"] in ("yes", "no")
    assert state["answer_reasoning_content"] and "<think>" not in state["answer_reasoning_content"]
    assert state["answer_reasoning_content"] in state.text().split("<think>")[1]


# ---- gen options --------------------------------------------------------------------------------


@sgl.function
def counting(s):
    s += "Count: 1, 2, 3," + sgl.gen("rest", 24, stop_regex=r"\b7\b")


def test_positional_max_tokens_and_stop_regex(backend):
    state = counting.run(temperature=0)
    assert state.error() is None
    assert "7" not in state["rest"] and state["rest"].startswith(" 4, 5, 6")
    assert state.get_meta_info("rest")["finish_reason"]["type"] == "stop"
    # the frontend closed the stream at the match: the request ended there, its KV came back
    deadline = time.monotonic() + 30
    while True:
        info = sgl.get_server_info()
        if info["running_requests"] == 0 and info["waiting_requests"] == 0:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    if isinstance(backend, sgl.EngineBackend):
        assert backend.engine.check_invariants()


@sgl.function
def samples(s):
    s += "A random fruit:" + sgl.gen("fruit", n=2, max_tokens=3, temperature=1.0, seed=1)


def test_gen_n_samples(backend):
    state = samples.run()
    assert state.error() is None
    assert isinstance(state["fruit"], list) and len(state["fruit"]) == 2
    assert state.text() == "A random fruit:" + state["fruit"][0]


@sgl.function
def prompt_logprobs(s):
    s += "The capital of France is Paris"
    s += sgl.gen(
        "lp",
        max_tokens=0,
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
    )


def test_prompt_logprobs_with_max_tokens_zero(backend):
    state = prompt_logprobs.run()
    meta = state.get_meta_info("lp")
    assert state["lp"] == "" and meta["completion_tokens"] == 0
    entries = meta["input_token_logprobs"]
    assert "".join(e[2] for e in entries) == "The capital of France is Paris"
    assert all(e[0] is None or e[0] <= 0 for e in entries)
    # SGLang's cot_decoding reads the next token's top-k this way
    (top,) = meta["output_top_logprobs"]
    assert len(top) == 2 and all(isinstance(t[2], str) for t in top) and top[0][0] >= top[1][0]


@sgl.function
def output_logprobs(s):
    s += "The capital of France is" + sgl.gen(
        "city", max_tokens=2, return_logprob=True, top_logprobs_num=2
    )


def test_output_logprobs(backend):
    state = output_logprobs.run(temperature=0)
    meta = state.get_meta_info("city")
    assert "".join(e[2] for e in meta["output_token_logprobs"]) == state["city"]
    assert state["city"].startswith(" Paris")
    assert all(len(row) == 2 for row in meta["output_top_logprobs"])


# ---- fork and join ------------------------------------------------------------------------------


@sgl.function
def parallel_decoding(s, topic):
    s += "Give two short tips for " + topic + ".\n"
    forks = s.fork(2)
    for i in range(2):
        forks[i] += f"Tip {i + 1}:"
        forks[i] += sgl.gen("tip", 8, stop=["\n"])
    forks.join()
    s += "Tips:\n"
    for i in range(2):
        s += f"{i + 1}." + forks[i]["tip"] + "\n"
    s += "In summary," + sgl.gen("summary", max_tokens=6)


def test_parallel_decoding(backend):
    state = parallel_decoding.run(topic="writing", temperature=0)
    assert state.error() is None
    assert len(state["tip"]) == 2
    assert "1." + state["tip"][0] in state.text() and isinstance(state["summary"], str)


@sgl.function
def parallel_encoding(s, question, context_0, context_1, context_2):
    s += "Read these statements.\n"
    contexts = [context_0, context_1, context_2]
    forks = s.fork(len(contexts))
    forks += lambda i: f"Statement {i}: " + contexts[i] + "\n"
    forks.join(mode="concate_and_append")
    s += "Question: " + question + "\nAnswer:" + sgl.gen("answer", max_tokens=4)


def test_parallel_encoding(backend):
    state = parallel_encoding.run(
        question="Who is the father of Julian?",
        context_0="Ethan is the father of Liam.",
        context_1="Noah is the father of Julian.",
        context_2="Oliver is the father of Carlos.",
        temperature=0,
    )
    assert state.error() is None
    statements = (
        "Statement 0: Ethan is the father of Liam.\n"
        "Statement 1: Noah is the father of Julian.\n"
        "Statement 2: Oliver is the father of Carlos.\n"
    )
    assert statements in state.text()
    assert state.text().endswith("\nAnswer:" + state["answer"])


@sgl.function
def gather_variables(s):
    s += "Name a color:"
    forks = s.fork(2)
    forks += [" red or", " blue or"]
    forks += sgl.gen("color", max_tokens=2)
    forks.join("gather_variable")


def test_fork_lists_and_gather_variable(backend):
    state = gather_variables.run(temperature=0)
    assert state.error() is None and len(state["color"]) == 2
    assert state.text() == "Name a color:"


@sgl.function
def copy_draft(s):
    s += "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of France?\nA:"
    with s.copy() as draft:
        draft += sgl.gen("draft", max_tokens=3, stop="\n")
    s += " The answer is" + sgl.gen("final", max_tokens=3, stop="\n")


def test_state_copy(backend):
    state = copy_draft.run(temperature=0)
    assert len(state["draft"]) == 1 and isinstance(state["draft"][0], str)
    # the copy's text stays in the copy; the parent continues from its own text
    assert state.text().endswith("A: The answer is" + state["final"])


# ---- composition, streaming, errors, backends -------------------------------------------------


@sgl.function
def ask(s, question):
    s += "Q: " + question + "\nA:" + sgl.gen("answer", stop="\n", max_tokens=6)


@sgl.function
def two_questions(s):
    s += "Answer each question with a city.\nQ: What is the capital of Italy?\nA: Rome\n"
    s += ask(question="What is the capital of France?")
    s += "\n"
    ask(s, "What is the capital of Japan?")


def test_programs_call_programs(backend):
    state = two_questions.run(temperature=0)
    assert state.error() is None
    assert state.text().count("Q: ") == 3 and "Tokyo" in state["answer"]


def calculate(expression):
    match = re.fullmatch(r"\s*(\d+)\s*\*\s*(\d+)\s*", expression)
    return str(int(match.group(1)) * int(match.group(2))) if match else "unknown"


@sgl.function
def tool_use(s, lhs, rhs):
    s += "Use calculate(expression) to compute.\ncalculate(3*4)=12\n"
    s += f"Question: What is the product of {lhs} and {rhs}?\n"
    s += "Answer: calculate(" + sgl.gen("expression", stop=")", max_tokens=8) + ") = "
    with s.var_scope("answer"):
        s += calculate(s["expression"])


def test_tool_use_called_without_a_state(backend):
    state = tool_use(lhs=25, rhs=4, temperature=0)  # SGLang: calling a program runs it
    assert state["answer"] == calculate(state["expression"])
    assert state.text().endswith(") = " + state["answer"])


@sgl.function
def streamed_qa(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=8))


def test_stream_text_iter(backend):
    state = streamed_qa(question="What is the capital of France?", stream=True, temperature=0)
    pieces = list(state.text_iter(var_name="answer"))
    assert "".join(pieces) == state["answer"] and "Paris" in state["answer"]


def test_stream_text_async_iter_with_meta_data(backend):
    import asyncio

    async def collect():
        state = streamed_qa.run(question="What is the capital of Japan?", stream=True, **GREEDY)
        items = [item async for item in state.text_async_iter("answer", return_meta_data=True)]
        return state, items

    state, items = asyncio.run(collect())
    assert "".join(piece for piece, _ in items) == state["answer"]
    assert items[-1][1]["finish_reason"]["type"] in ("stop", "length")


@sgl.function
def failing_program(s):
    s += "Q:" + sgl.gen("a", max_tokens=2)
    raise RuntimeError("the program's own bug")


def test_program_exceptions_propagate(backend):
    with pytest.raises(RuntimeError, match="the program's own bug"):
        failing_program.run()


@sgl.function
def invalid_grammar(s):
    s += "Q:" + sgl.gen("a", json_schema='{"type": "nonsense"}', max_tokens=4)


def test_server_errors_are_recorded_not_raised(backend):
    state = invalid_grammar.run()
    assert state.error() is not None  # the backend refused the schema; run() did not raise


@sgl.function(num_api_spec_tokens=32)
def speculative_character(s):
    s += "Name: Steve Jobs.\nJob: Apple CEO.\n\nName:" + sgl.gen("name", stop="\n", max_tokens=6)
    s += "\nJob:" + sgl.gen("job", stop="\n", max_tokens=6)


def test_function_with_num_api_spec_tokens(backend):
    state = speculative_character.run(temperature=0)
    assert state.error() is None and "\nJob:" + state["job"] in state.text()


def test_server_info_and_flush_cache(backend):
    info = sgl.get_server_info()
    assert isinstance(info, dict) and info
    sgl.flush_cache()
    cached = few_shot_qa.run(question="What is the capital of France?")
    assert cached["answer"].strip() == "Paris"


def test_global_config_default_backend_and_verbosity(backend, capsys):
    assert sgl.global_config.default_backend is backend
    sgl.global_config.verbosity = 2
    try:
        state = few_shot_qa.run(question="What is the capital of Japan?")
    finally:
        sgl.global_config.verbosity = 0
    assert state.text() in capsys.readouterr().out
