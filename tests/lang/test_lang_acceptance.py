"""Acceptance: real programs on the demo model (a small random-weight Llama), in process
(EngineBackend) and through a real server on 127.0.0.1 (rl.Runtime, marked slow).

References are computed without the frontend: greedy outputs with ``Engine.generate`` on the
exact prompt, select decisions from transformers' logprobs of the same weights.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

import radixlm_lang as rl

GREEDY = {"temperature": 0.0}


@pytest.fixture(params=["engine", pytest.param("server", marks=pytest.mark.slow)])
def backend(request):
    if request.param == "engine":
        return request.getfixturevalue("engine_backend")
    return request.getfixturevalue("server_runtime")


def reference(engine, prompt: str, **params) -> str:
    """The engine's own greedy completion of ``prompt``."""
    return engine.generate(prompt=prompt, sampling_params={**GREEDY, **params})["text"]


def chat_prompt(tokenizer, messages, generation_prompt=True) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)  # fmt: skip
    return text.removeprefix(tokenizer.bos_token)


@rl.function
def few_shot(s, question):
    s += "Answer briefly.\n"
    s += "Q: What color is the sky?\nA: Blue.\n"
    s += "Q: How many days are in a week?\nA: Seven.\n"
    s += f"Q: {question}\nA:" + rl.gen("answer", max_tokens=12, stop="\n")


def test_few_shot_qa(backend, engine):
    state = few_shot.run(question="What is 2 + 3?", backend=backend, **GREEDY)
    assert state.error() is None
    prompt = state.text()[: len(state.text()) - len(state["answer"])]
    assert prompt.endswith("Q: What is 2 + 3?\nA:")
    assert state["answer"] == reference(engine, prompt, max_new_tokens=12, stop=["\n"])
    meta = state.get_meta_info("answer")
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode(prompt))


@rl.function
def conversation(s, turns):
    s += rl.system("You are a helpful assistant.")
    for i, turn in enumerate(turns):
        s += rl.user(turn)
        s += rl.assistant(rl.gen(f"reply{i}", max_tokens=8))


def test_multi_turn_chat(backend, engine):
    turns = ["Hello there.", "Tell me more.", "Thanks!"]
    state = conversation.run(turns=turns, backend=backend, **GREEDY)
    assert state.error() is None
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3
    tokenizer = engine.tokenizer
    assert state.text() == chat_prompt(tokenizer, messages, generation_prompt=False)
    for i in range(3):
        history = messages[: 2 + 2 * i]
        expected = reference(engine, chat_prompt(tokenizer, history), max_new_tokens=8)
        assert state[f"reply{i}"] == expected
    # Each later turn extends the previous prompt, so the radix cache serves it.
    first_prompt = state.get_meta_info("reply0")["prompt_tokens"]
    assert state.get_meta_info("reply1")["cached_tokens"] >= first_prompt - 1


@rl.function
def branches(s, mode):
    s += "List three fruits:"
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += f" option {i}:" + rl.gen("fruit", max_tokens=5)
    forks.join(mode)
    s += " End."


@pytest.mark.parametrize("mode", ["gather", "concat"])
def test_fork_join(backend, engine, mode):
    state = branches.run(mode=mode, backend=backend, **GREEDY)
    assert state.error() is None
    expected = [reference(engine, f"List three fruits: option {i}:", max_new_tokens=5)
                for i in range(3)]  # fmt: skip
    if mode == "gather":
        assert state["fruit"] == expected
        assert state.text() == "List three fruits: End."
    else:
        middle = "".join(f" option {i}:{text}" for i, text in enumerate(expected))
        assert state.text() == "List three fruits:" + middle + " End."


@rl.function
def nested(s):
    forks = s.fork(2)  # a fork before any text
    for i, f in enumerate(forks):
        f += f"Topic {i}."
        inner = f.fork(2)
        for j, g in enumerate(inner):
            g += f" Point {j}:" + rl.gen("point", max_tokens=4)
        inner.join("gather")
    forks.join("gather")


def test_nested_forks_before_any_text(backend, engine):
    state = nested.run(backend=backend, **GREEDY)
    assert state.error() is None
    assert state["point"] == [
        [reference(engine, f"Topic {i}. Point {j}:", max_new_tokens=4) for j in range(2)]
        for i in range(2)
    ]


# ---- select: every method against transformers' logprobs ------------------------------------

SELECT_PREFIX = "The weather today is"
SELECT_CHOICES = [" sunny", " cloudy with rain", " cold", " unbelievably hot and humid"]


def hf_choice_logprobs(hf_model, tokenizer, prefix, choice, conditional=True):
    """Logprobs of the choice's tokens, computed with transformers (the independent oracle)."""
    prefix_ids = tokenizer.encode(prefix)
    full = tokenizer.encode(prefix + choice)
    start = 0
    while start < min(len(prefix_ids), len(full)) and prefix_ids[start] == full[start]:
        start += 1
    start = max(1, min(start, len(full) - 1))
    ids = full if conditional else [tokenizer.bos_token_id] + full[start:]
    first = start if conditional else 1
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(first, len(ids))]


def expected_choice(method, cond, uncond):
    if method is rl.token_length_normalized:
        scores = [sum(r) / len(r) for r in cond]
    elif method is rl.unconditional_likelihood_normalized:
        scores = [sum(c - u for c, u in zip(cr, ur)) / len(cr) for cr, ur in zip(cond, uncond)]
    else:  # greedy: lexicographic maximum of the rows padded with their means
        width = max(map(len, cond))
        scores = [r + [sum(r) / len(r)] * (width - len(r)) for r in cond]
    return scores.index(max(scores)), scores


@pytest.mark.parametrize(
    "method",
    [rl.token_length_normalized, rl.greedy_token_selection, rl.unconditional_likelihood_normalized],
    ids=lambda m: m.name,
)
def test_select_matches_transformers_logprobs(backend, engine, hf_model, method):
    @rl.function
    def pick(s):
        s += SELECT_PREFIX + rl.select("w", SELECT_CHOICES, choices_method=method)

    state = pick.run(backend=backend)
    assert state.error() is None
    tok = engine.tokenizer
    cond = [hf_choice_logprobs(hf_model, tok, SELECT_PREFIX, c) for c in SELECT_CHOICES]
    uncond = [hf_choice_logprobs(hf_model, tok, SELECT_PREFIX, c, False) for c in SELECT_CHOICES]
    index, _ = expected_choice(method, cond, uncond)
    assert state["w"] == SELECT_CHOICES[index]
    assert state.text() == SELECT_PREFIX + SELECT_CHOICES[index]
    meta = state.get_meta_info("w")
    for got, want in zip(meta["token_logprobs"], cond):
        assert got == pytest.approx(want, abs=1e-3)
    if method.needs_unconditional:
        for got, want in zip(meta["unconditional_token_logprobs"], uncond):
            assert got == pytest.approx(want, abs=1e-3)


# ---- constrained gen ------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"size": {"enum": ["S", "M", "L"]}, "count": {"type": "integer",
                   "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["size", "count", "ok"],
    "additionalProperties": False,
}  # fmt: skip
REGEX = r"[A-Z]{2}-[0-9]{3}"


@rl.function
def structured(s):
    s += "Order as JSON: " + rl.gen("order", json_schema=SCHEMA, max_tokens=64)
    s += "\nCode: " + rl.gen("code", regex=REGEX, max_tokens=16)
    s += "\nQuantity: " + rl.gen("qty", dtype=int, max_tokens=24)


def test_regex_json_and_dtype_gen(backend):
    state = structured.run(backend=backend, **GREEDY)
    assert state.error() is None, state.error()
    assert state.get_meta_info("order")["finish_reason"]["type"] == "stop"
    jsonschema.validate(json.loads(state["order"]), SCHEMA)
    assert re.fullmatch(REGEX, state["code"])
    assert re.fullmatch(rl.REGEX_INT, state["qty"])  # SGLang's dtype: the raw digits
    int(state["qty"])
    assert state.text().endswith(f"\nQuantity: {state['qty']}")


# ---- streaming, batches, errors --------------------------------------------------------------


def test_streaming(backend, engine):
    state = few_shot.run(question="Why?", backend=backend, stream=True, **GREEDY)
    pieces = list(state.text_iter("answer"))
    assert state.error() is None
    assert "".join(pieces) == state["answer"]
    everything = "".join(few_shot.run(question="Why?", backend=backend, stream=True,
                                      **GREEDY).text_iter())  # fmt: skip
    assert everything == state.text()


def test_run_batch_with_progress_bar(backend, capsys):
    questions = [f"What is {i} + {i}?" for i in range(5)]
    states = few_shot.run_batch([{"question": q} for q in questions], backend=backend,
                                num_threads=3, progress_bar=True, **GREEDY)  # fmt: skip
    assert "5/5" in capsys.readouterr().err
    for question, state in zip(questions, states):
        alone = few_shot.run(question=question, backend=backend, **GREEDY)
        assert state.error() is None and state["answer"] == alone["answer"]


def test_errors_surface_in_state_error(backend, engine):
    @rl.function
    def too_long(s):
        s += "Hello" + rl.gen("x", max_tokens=engine.context_length + 10)
        s += rl.gen("y", max_tokens=2)

    state = too_long.run(backend=backend)
    assert "maximum context length" in str(state.error())
    with pytest.raises(rl.ProgramError):
        state["y"]

    @rl.function
    def bad_regex(s):
        s += "x" + rl.gen("x", regex="(unclosed", max_tokens=4)

    with pytest.raises(re.error):  # as SGLang's gen, the pattern is checked in the program
        bad_regex.run(backend=backend)

    @rl.function
    def unsupported_regex(s):
        s += "x" + rl.gen("x", regex="a(?=b)", max_tokens=4)  # valid Python, no lookarounds

    assert unsupported_regex.run(backend=backend).error() is not None
