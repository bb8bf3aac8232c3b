"""What the interpreter asks of a model backend.

A backend turns prompt text into completions, warms the prefix cache, scores the choices of a
``select`` and renders chat messages with the model's template. The interpreter never sees HTTP,
tokenizers or engines: only these methods and the plain data classes below.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from radixlm_lang.chat import ChatRenderer
from radixlm_lang.choices import ChoiceLogprobs
from radixlm_lang.sampling import SamplingParams


class BackendError(RuntimeError):
    """A backend could not serve a request; the message says why (e.g. the server's error)."""

    def __init__(self, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Completion:
    """One finished generation: its text and the backend's ``meta_info``."""

    text: str
    meta_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamDelta:
    """A piece of a streamed generation; ``meta_info`` is set on the last piece only."""

    text: str
    meta_info: dict[str, Any] | None = None


Messages = list[dict[str, str]]


class Backend:
    """Base of every backend.

    Subclasses implement :meth:`generate`, :meth:`score_choices` and :meth:`render_chat`, and may
    override :meth:`generate_stream` (default: one delta holding the whole completion) and
    :meth:`cache_prefix` (default: a zero-token generation).

    ``uses_chat_messages`` is True for backends that receive a chat as messages rather than as
    rendered text (OpenAI-style chat APIs): a gen inside an assistant message then gets the
    messages so far.
    """

    uses_chat_messages = False

    def __init__(self) -> None:
        self._renderer: ChatRenderer | None = None
        self._renderer_lock = threading.Lock()

    def generate(
        self, prompt: str, params: SamplingParams, messages: Messages | None = None
    ) -> Completion:
        """Continue ``prompt`` (or, for chat-message backends, the ``messages``).

        Args:
            prompt: the full text so far.
            params: the merged generation parameters.
            messages: the chat so far when a chat-message backend generates an assistant turn.

        Returns:
            The completion.
        """
        raise NotImplementedError

    def generate_samples(
        self, prompt: str, params: SamplingParams, messages: Messages | None = None
    ) -> list[Completion]:
        """``params.n`` independent completions of ``prompt``.

        The default asks for them one by one (with seeds ``seed``, ``seed + 1``, ... when a seed
        is set, as the runtime numbers the samples of one request).
        """
        one = dataclasses.replace(params, n=None)
        samples = []
        for i in range(params.n or 1):
            seeded = one if params.seed is None else dataclasses.replace(one, seed=params.seed + i)
            samples.append(self.generate(prompt, seeded, messages))
        return samples

    def generate_stream(
        self, prompt: str, params: SamplingParams, messages: Messages | None = None
    ) -> Iterator[StreamDelta]:
        """Like :meth:`generate`, yielding the text as it is produced."""
        completion = self.generate(prompt, params, messages)
        yield StreamDelta(completion.text, completion.meta_info)

    def cache_prefix(self, prompt: str) -> dict[str, Any]:
        """Send ``prompt`` once with no output so the server's prefix cache holds it.

        Returns:
            The request's meta_info.
        """
        return self.generate(prompt, SamplingParams(max_new_tokens=0)).meta_info

    def score_choices(
        self, prompt: str, choices: Sequence[str], unconditional: bool = False
    ) -> ChoiceLogprobs:
        """Logprob of each token of each choice appended to ``prompt``.

        Args:
            prompt: the text before the choice.
            choices: the candidate continuations.
            unconditional: also score each choice's tokens without the prompt.

        Returns:
            The scored tokens of every choice.
        """
        raise NotImplementedError

    def render_chat(self, messages: Messages) -> str:
        """Render chat messages with the model's template, without the BOS the tokenizer adds."""
        raise NotImplementedError

    def token_texts(self, ids: list[int]) -> list[str]:
        """The text of each token id on its own (for logprob entries that carry text)."""
        raise NotImplementedError(f"{type(self).__name__} cannot turn token ids into text")

    def flush_cache(self) -> Any:
        """Empty the server's prefix cache."""
        raise NotImplementedError(f"{type(self).__name__} has no prefix cache to flush")

    def get_server_info(self) -> dict[str, Any]:
        """The server's figures and settings."""
        raise NotImplementedError(f"{type(self).__name__} does not report server information")

    def chat_renderer(self) -> ChatRenderer:
        """The memoizing role header/footer renderer over :meth:`render_chat` (one per backend)."""
        with self._renderer_lock:
            if self._renderer is None:
                self._renderer = ChatRenderer(self.render_chat)
            return self._renderer

    def shutdown(self) -> None:
        """Release what the backend holds (connections, processes); default: nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def strip_bos(text: str, bos_token: str | None) -> str:
    """``text`` without a leading BOS string (the tokenizer adds BOS to prompts itself)."""
    if bos_token and text.startswith(bos_token):
        return text[len(bos_token) :]
    return text
