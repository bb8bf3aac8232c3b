"""Role headers/footers from a chat template reproduce the template's own rendering."""

from __future__ import annotations

import jinja2
import pytest

from radixlm.model.demo import CHAT_TEMPLATE as DEMO_TEMPLATE
from radixlm_lang.backends.base import strip_bos
from radixlm_lang.chat import ChatRenderer, ChatTemplateError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
# Adds a default system prompt when the conversation does not start with one.
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}[SYS]You are helpful.[/SYS]{% endif %}"
    "{% for m in messages %}[{{ m['role'] | upper }}]{{ m['content'] | trim }}[END]{% endfor %}"
)
# Numbers every message with the conversation length: earlier text changes as messages are added.
UNSTABLE = "{% for m in messages %}{{ messages | length }}:{{ m['content'] }};{% endfor %}"

SEQUENCES = [
    ("user",),
    ("user", "assistant"),
    ("system", "user", "assistant"),
    ("system", "user", "assistant", "user", "assistant"),
    ("user", "assistant", "user", "assistant", "user"),
]


def jinja_render(template: str, bos: str = "<s>", eos: str = "</s>"):
    compiled = jinja2.Environment().from_string(template)

    def render(messages):
        return strip_bos(compiled.render(messages=messages, bos_token=bos, eos_token=eos), bos)

    return render


def hf_render(tokenizer):
    def render(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return strip_bos(text, tokenizer.bos_token)

    return render


def incremental(renderer: ChatRenderer, roles, contents) -> str:
    out = ""
    for i, (role, content) in enumerate(zip(roles, contents)):
        header = renderer.header(tuple(roles[:i]), role)
        out += header + content + renderer.footer(tuple(roles[: i + 1]))
    return out


def check_matches_full_render(render, roles):
    contents = [f"message number {i}" for i in range(len(roles))]
    expected = render([{"role": r, "content": c} for r, c in zip(roles, contents)])
    assert incremental(ChatRenderer(render), roles, contents) == expected


@pytest.mark.parametrize("roles", SEQUENCES)
def test_llama3_template(llama3_tokenizer, roles):
    check_matches_full_render(hf_render(llama3_tokenizer), roles)


@pytest.mark.parametrize("roles", SEQUENCES)
def test_llama2_template_folds_system_into_first_user_turn(llama2_tokenizer, roles):
    check_matches_full_render(hf_render(llama2_tokenizer), roles)


@pytest.mark.parametrize("template", [CHATML, DEFAULT_SYSTEM, DEMO_TEMPLATE])
@pytest.mark.parametrize("roles", SEQUENCES)
def test_other_templates(template, roles):
    check_matches_full_render(jinja_render(template), roles)


def test_header_of_first_message_has_no_bos(llama3_tokenizer):
    header = ChatRenderer(hf_render(llama3_tokenizer)).header((), "user")
    assert header == "<|start_header_id|>user<|end_header_id|>\n\n"


def test_non_incremental_template_is_a_clear_error():
    renderer = ChatRenderer(jinja_render(UNSTABLE))
    renderer.header((), "user")
    with pytest.raises(ChatTemplateError, match="cannot be applied incrementally"):
        renderer.header(("user",), "assistant")


def test_template_exceptions_become_chat_template_errors():
    renderer = ChatRenderer(jinja_render(DEMO_TEMPLATE.replace("raise_exception", "undefined_fn")))
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        renderer.header((), "tool")


def test_renders_are_memoized():
    calls = []
    render = jinja_render(CHATML)

    def counting(messages):
        calls.append(len(messages))
        return render(messages)

    renderer = ChatRenderer(counting)
    renderer.header((), "user"), renderer.footer(("user",))
    first = len(calls)
    renderer.header((), "user"), renderer.footer(("user",))
    assert len(calls) == first
