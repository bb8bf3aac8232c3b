"""Pure-language behaviour of the interpreter, on the scripted in-test backend."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import scripted_completion

import radixlm_lang as rl
from radixlm_lang.chat import ChatRenderer


def test_text_and_variables_assemble_in_order(scripted):
    @rl.function
    def program(s, topic):
        s += "Topic: " + topic + "\n"
        s += "Answer:" + rl.gen("answer", max_tokens=3)
        s += "\nAgain:" + rl.gen("again")

    state = program.run(topic="cats", backend=scripted)
    first = scripted_completion("Topic: cats\nAnswer:", 3)
    prompt2 = f"Topic: cats\nAnswer:{first}\nAgain:"
    second = scripted_completion(prompt2, None)
    assert state.error() is None
    assert state["answer"] == first and state["again"] == second
    assert state.text() == prompt2 + second
    assert [p for _, p, _ in scripted.requests] == ["Topic: cats\nAnswer:", prompt2]


def test_gen_parameters_override_run_defaults(scripted):
    @rl.function
    def program(s):
        s += rl.gen("a", max_tokens=2)
        s += rl.gen("b")

    program.run(backend=scripted, temperature=0, max_new_tokens=9)
    (_, _, first), (_, _, second) = scripted.requests
    assert first.max_new_tokens == 2 and first.temperature == 0
    assert second.max_new_tokens == 9 and second.temperature == 0


def test_unknown_run_keyword_is_a_type_error(scripted):
    @rl.function
    def program(s, x):
        s += x

    with pytest.raises(TypeError, match="unexpected argument 'y'"):
        program.run(x="a", y="b", backend=scripted)


def test_roles_use_the_chat_template_and_build_messages(scripted, llama3_tokenizer):
    @rl.function
    def chat(s):
        s += rl.system("Be terse.")
        s += rl.user("Hi")
        s += rl.assistant(rl.gen("reply", max_tokens=4))
        with s.user():
            s += "Again"
        s += rl.assistant_begin() + rl.gen("second", max_tokens=4) + rl.assistant_end()

    state = chat.run(backend=scripted)
    assert state.error() is None
    messages = state.messages()
    assert messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": state["reply"]},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": state["second"]},
    ]
    full = llama3_tokenizer.apply_chat_template(messages, tokenize=False)
    assert state.text() == full.removeprefix(llama3_tokenizer.bos_token)
    # The assistant gen saw the generation prompt the template would add.
    prompt = scripted.requests[0][1]
    expected = llama3_tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt == expected.removeprefix(llama3_tokenizer.bos_token)


def test_nested_role_is_an_error(scripted):
    @rl.function
    def bad(s):
        s += rl.user_begin() + rl.assistant("x")

    state = bad.run(backend=scripted)
    assert isinstance(state.error(), rl.ProgramError)
    assert "inside a 'user'" in str(state.error())


def test_var_scope_captures_appended_text(scripted):
    @rl.function
    def program(s):
        s += "before "
        with s.var_scope("scoped"):
            s += "inside " + rl.gen(max_tokens=2)
        s += " after"

    state = program.run(backend=scripted)
    completion = scripted_completion("before inside ", 2)
    assert state["scoped"] == "inside " + completion


def test_fork_sends_prefix_once_then_branches_and_gathers(scripted):
    @rl.function
    def program(s):
        s += "Shared prefix."
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f" Branch {i}:" + rl.gen("idea", max_tokens=4)
        forks.join("gather")
        s += " Done"

    state = program.run(backend=scripted)
    assert state.error() is None
    assert scripted.requests[0] == ("cache_prefix", "Shared prefix.", None)
    ideas = [scripted_completion(f"Shared prefix. Branch {i}:", 4) for i in range(3)]
    assert state["idea"] == ideas
    assert state.text() == "Shared prefix. Done"  # gather leaves the parent's text alone


def test_concat_join_appends_branch_text_in_order(scripted):
    @rl.function
    def program(s):
        s += "P"
        forks = s.fork(2)
        forks += "-"
        forks[1] += "second"
        forks[0] += "first"
        forks.join("concat")

    state = program.run(backend=scripted)
    assert state.text() == "P-first-second"


def test_fork_before_any_text_sends_no_prefix(scripted):
    @rl.function
    def program(s):
        forks = s.fork(2)
        forks += rl.gen("x", max_tokens=3)
        forks.join()

    state = program.run(backend=scripted)
    assert "cache_prefix" not in scripted.kinds()
    assert state["x"] == [scripted_completion("", 3)] * 2


def test_nested_forks(scripted):
    @rl.function
    def tree(s):
        s += "Root."
        top = s.fork(2)
        for i, branch in enumerate(top):
            branch += f" L{i}"
            leaves = branch.fork(2)
            for j, leaf in enumerate(leaves):
                leaf += f".{j}:" + rl.gen("leaf", max_tokens=3)
            leaves.join("gather")
        top.join("gather")

    state = tree.run(backend=scripted)
    assert state.error() is None
    expected = [[scripted_completion(f"Root. L{i}.{j}:", 3) for j in range(2)] for i in range(2)]
    assert state["leaf"] == expected
    warmed = [p for kind, p, _ in scripted.requests if kind == "cache_prefix"]
    assert sorted(warmed) == ["Root.", "Root. L0", "Root. L1"]


def test_fork_branches_run_concurrently(make_scripted):
    barrier = threading.Barrier(3, timeout=10)

    def complete(prompt, max_new_tokens):
        barrier.wait()  # only passes when all three branches are generating at once
        return "ok"

    backend = make_scripted(complete=complete)

    @rl.function
    def program(s):
        forks = s.fork(3)
        forks += rl.gen("x")
        forks.join()

    state = program.run(backend=backend)
    assert state.error() is None and state["x"] == ["ok"] * 3


def test_backend_errors_surface_in_state_error(make_scripted):
    backend = make_scripted(fail_on="boom")

    @rl.function
    def program(s):
        s += "boom " + rl.gen("a")
        s += rl.gen("b")

    state = program.run(backend=backend)
    assert isinstance(state.error(), RuntimeError) and "scripted failure" in str(state.error())
    assert len(backend.requests) == 1  # the steps after the failure were skipped
    with pytest.raises(rl.ProgramError, match="'a' was not produced"):
        state["a"]


def test_aborted_generation_is_an_error_with_the_partial_output(make_scripted):
    backend = make_scripted()
    aborted = {"finish_reason": {"type": "abort", "message": "client went away"}}
    backend.generate = lambda prompt, params, messages=None: rl.backends.Completion("par", aborted)

    @rl.function
    def program(s):
        s += rl.gen("a") + rl.gen("b")

    state = program.run(backend=backend)
    assert isinstance(state.error(), rl.GenerationAborted)
    assert "client went away" in str(state.error())
    assert state["a"] == "par" and state.text() == "par"


def test_exception_in_program_code_is_reraised_by_run(scripted):
    @rl.function
    def program(s):
        s += "x"
        raise ValueError("bad program")

    with pytest.raises(ValueError, match="bad program"):
        program.run(backend=scripted)


def test_exception_in_program_code_of_a_streamed_run_is_recorded(scripted):
    @rl.function
    def program(s):
        s += "x"
        raise ValueError("bad program")

    state = program.run(backend=scripted, stream=True)
    assert "".join(state.text_iter()) == "x"
    assert isinstance(state.error(), ValueError)


def test_reading_a_failed_variable_inside_the_program_raises_chained_to_the_cause(make_scripted):
    backend = make_scripted(fail_on="boom")

    @rl.function
    def program(s):
        s += "boom" + rl.gen("a")
        s += s["a"]

    with pytest.raises(rl.ProgramError, match="'a' was not produced") as info:
        program.run(backend=backend)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_fork_branch_error_surfaces_at_join(make_scripted):
    backend = make_scripted(fail_on="bad branch")

    @rl.function
    def program(s):
        forks = s.fork(2)
        forks[0] += "fine" + rl.gen("x")
        forks[1] += "bad branch" + rl.gen("x")
        forks.join()

    state = program.run(backend=backend)
    assert isinstance(state.error(), rl.ProgramError)
    assert "fork branch 1 failed" in str(state.error())


def test_select_appends_the_best_choice_and_records_scores(make_scripted):
    backend = make_scripted(choice_logprobs={"red": [-2.0], "green": [-0.5, -0.7], "blue": [-3.0]})

    @rl.function
    def program(s):
        s += "Color: " + rl.select("color", ["red", "green", "blue"]) + "."

    state = program.run(backend=backend)
    assert state["color"] == "green" and state.text() == "Color: green."
    meta = state.get_meta_info("color")
    assert meta["selected_index"] == 1 and meta["scores"] == pytest.approx([-2.0, -0.6, -3.0])
    assert backend.requests[0] == ("score", "Color: ", ("red", "green", "blue"))


def test_streaming_yields_text_as_it_is_generated(scripted):
    @rl.function
    def program(s):
        s += "Q:"
        s += rl.gen("a", max_tokens=4)

    state = program.run(backend=scripted, stream=True)
    pieces = list(state.text_iter())
    completion = scripted_completion("Q:", 4)
    assert pieces == ["Q:", *completion]
    assert "".join(pieces) == state.text()
    assert list(program.run(backend=scripted, stream=True).text_iter("a")) == list(completion)


def test_async_text_iter(scripted):
    @rl.function
    def program(s):
        s += "Q:" + rl.gen("a", max_tokens=3)

    async def collect():
        state = program.run(backend=scripted, stream=True)
        return [piece async for piece in state.text_async_iter("a")]

    assert "".join(asyncio.run(collect())) == scripted_completion("Q:", 3)


def test_run_batch_keeps_order_and_shows_progress(scripted, capsys):
    @rl.function
    def program(s, n):
        s += f"n={n}:" + rl.gen("x", max_tokens=4)

    states = program.run_batch(
        [{"n": i} for i in range(6)], backend=scripted, num_threads=3, progress_bar=True
    )
    assert [st["x"] for st in states] == [scripted_completion(f"n={i}:", 4) for i in range(6)]
    assert "6/6" in capsys.readouterr().err
    program.run_batch([{"n": 0}], backend=scripted)  # SGLang's default: no bar
    assert "1/1" not in capsys.readouterr().err


def test_default_backend(scripted):
    @rl.function
    def program(s):
        s += rl.gen("x", max_tokens=2)

    rl.set_default_backend(scripted)
    try:
        assert program.run()["x"] == scripted_completion("", 2)
    finally:
        rl.set_default_backend(None)
    with pytest.raises(ValueError, match="no backend"):
        program.run()


def test_program_composition(scripted):
    @rl.function
    def greet(s, name):
        s += f"Hello {name}. "

    @rl.function
    def program(s):
        greet(s, "Ada")
        s += rl.gen("x", max_tokens=2)

    assert program.run(backend=scripted).text().startswith("Hello Ada. ")


class ChatMessageBackend:
    """Records what a chat-message (OpenAI-chat-style) backend would be sent."""

    uses_chat_messages = True

    def __init__(self):
        self.sent = []
        self._renderer = ChatRenderer(
            lambda ms: "".join(f"{m['role']}: {m['content']}\n" for m in ms)
        )

    def chat_renderer(self):
        return self._renderer

    def generate(self, prompt, params, messages=None):
        from radixlm_lang.backends.base import Completion

        self.sent.append(messages)
        return Completion("reply")


def test_chat_message_backends_receive_the_messages():
    backend = ChatMessageBackend()

    @rl.function
    def chat(s):
        s += rl.system("S") + rl.user("U")
        s += rl.assistant(rl.gen("a"))
        s += rl.assistant("partial " + rl.gen("b"))

    state = chat.run(backend=backend)
    assert backend.sent == [[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]]
    assert state["a"] == "reply"
    assert "partially written assistant message" in str(state.error())
