"""Splitting a reasoning model's output into its reasoning and its answer (``separate_reasoning``).

Reasoning models wrap their thinking in tags (``<think> ... </think>``). Some chat templates
open the tag in the prompt, so the output holds only the closing tag; those formats are
"forced": text before the closing tag is reasoning even without an opening tag, and an output
with no closing tag at all was cut off while still reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

# ``separate_reasoning`` stores the reasoning of variable ``x`` in ``x + REASONING_SUFFIX``.
REASONING_SUFFIX = "_reasoning_content"


@dataclass(frozen=True)
class ReasoningFormat:
    """The tags of one model family, and whether its output starts inside the reasoning."""

    start: str
    end: str
    forced: bool


_THINK = ReasoningFormat("<think>", "</think>", forced=False)
_THINK_FORCED = ReasoningFormat("<think>", "</think>", forced=True)
_KIMI = ReasoningFormat("◁think▷", "◁/think▷", forced=False)

FORMATS: dict[str | None, ReasoningFormat] = {
    None: _THINK,
    "deepseek-r1": _THINK_FORCED,
    "deepseek-v3": _THINK,
    "qwen3": _THINK,
    "qwen3-thinking": _THINK_FORCED,
    "kimi": _KIMI,
    "kimi_k2": _KIMI,
}


def reasoning_format(model_type: str | None) -> ReasoningFormat:
    """The format of ``model_type``.

    Raises:
        ValueError: an unknown model type, listing the known ones.
    """
    try:
        return FORMATS[model_type]
    except KeyError:
        known = ", ".join(sorted(k for k in FORMATS if k))
        raise ValueError(f"unknown reasoning model_type {model_type!r}; known: {known}") from None


def split_reasoning(text: str, model_type: str | None) -> tuple[str, str]:
    """Split ``text`` into (reasoning, answer).

    Args:
        text: the generated output.
        model_type: the format (see :data:`FORMATS`).

    Returns:
        The reasoning without its tags and the answer, both stripped of surrounding whitespace;
        ``("", text)`` when the output holds no reasoning.
    """
    fmt = reasoning_format(model_type)
    body = text.lstrip()
    opened = body.startswith(fmt.start)
    if opened:
        body = body[len(fmt.start) :]
    elif not fmt.forced:
        return "", text
    reasoning, closed, answer = body.partition(fmt.end)
    if not closed:
        return body.strip(), ""  # cut off before the reasoning ended
    return reasoning.strip(), answer.strip()
