"""Role headers and footers derived from the model's own chat template.

A program appends chat messages piece by piece (``s += rl.user(...)`` then later
``s += rl.assistant(rl.gen(...))``), but a chat template renders whole conversations. We recover
the text that goes before and after each message by rendering *skeleton* conversations whose
contents are unique sentinel strings and cutting the rendering at the sentinels: the text before
a message's sentinel (beyond what earlier messages already emitted) is its header, the text after
it is its footer. Message contents are then appended verbatim between header and footer.

Some templates render a message only once a later one exists (Llama 2 folds the system prompt
into the first user turn); for those the skeleton is rendered with one look-ahead message and the
text up to the look-ahead's content is given to the earlier message's footer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RenderFn = Callable[[list[dict[str, str]]], str]


class ChatTemplateError(RuntimeError):
    """The chat template cannot render the program's sequence of roles incrementally."""


def _sentinel(index: int) -> str:
    return f"rlsentinel{index}x"


_LOOKAHEAD = "rllookaheadx"


class ChatRenderer:
    """Computes role headers/footers for any role sequence, memoized per sequence.

    Args:
        render: renders a list of ``{"role", "content"}`` messages to prompt text (without the
            BOS token that the tokenizer adds by itself).
    """

    def __init__(self, render: RenderFn):
        self._render = render
        self._memo: dict[Any, Any] = {}

    def header(self, history: tuple[str, ...], role: str) -> str:
        """Text that opens a ``role`` message following messages of roles ``history``.

        Raises:
            ChatTemplateError: the template cannot render this sequence incrementally.
        """
        key = ("header", history, role)
        if key not in self._memo:
            rendered, start, _ = self._locate(history + (role,))
            emitted = self._skeleton(history)
            if not rendered[:start].startswith(emitted):
                raise ChatTemplateError(
                    f"the chat template re-renders earlier messages when a {role!r} message "
                    f"follows {list(history)}; it cannot be applied incrementally"
                )
            self._memo[key] = rendered[len(emitted) : start]
        return self._memo[key]

    def footer(self, roles: tuple[str, ...]) -> str:
        """Text that closes the last message of the role sequence ``roles``."""
        key = ("footer", roles)
        if key not in self._memo:
            rendered, _, end = self._locate(roles)
            cut = rendered.find(_LOOKAHEAD, end)
            if cut >= 0:
                # Everything up to the look-ahead's content belongs to this message.
                self._memo[key] = rendered[end:cut]
            else:
                self._memo[key] = rendered[end:]
        return self._memo[key]

    def _skeleton(self, roles: tuple[str, ...]) -> str:
        """The text emitted for complete messages ``roles`` (contents as sentinels)."""
        if not roles:
            return ""
        history, role = roles[:-1], roles[-1]
        return (
            self._skeleton(history)
            + self.header(history, role)
            + _sentinel(len(history))
            + self.footer(roles)
        )

    def _locate(self, roles: tuple[str, ...]) -> tuple[str, int, int]:
        """Render a skeleton of ``roles``; return it and the span of the last sentinel."""
        messages = [{"role": r, "content": _sentinel(i)} for i, r in enumerate(roles)]
        target = _sentinel(len(roles) - 1)
        rendered = self._safe_render(messages)
        if target not in rendered:
            follower = "assistant" if roles[-1] == "user" else "user"
            rendered = self._safe_render(messages + [{"role": follower, "content": _LOOKAHEAD}])
        start = rendered.find(target)
        if start < 0:
            raise ChatTemplateError(
                f"the chat template does not render the content of a {roles[-1]!r} message "
                f"after {list(roles[:-1])}"
            )
        return rendered, start, start + len(target)

    def _safe_render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self._render(messages)
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template's raise_exception() or a transport error
            roles = [m["role"] for m in messages]
            raise ChatTemplateError(f"chat template failed for roles {roles}: {exc}") from exc
