"""In-process backend: a ``radixlm.Engine`` in this Python process (the only place the frontend
imports the runtime)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from radixlm_lang.backends.base import Messages, strip_bos
from radixlm_lang.backends.native import NativeBackend
from radixlm_lang.chat import ChatTemplateError
from radixlm_lang.server_args import translate_server_args


class EngineBackend(NativeBackend):
    """Runs programs on an in-process :class:`radixlm.Engine`.

    Args:
        engine: a running engine; when None, one is started from ``engine_args`` (e.g.
            ``model="dir"``; no model = the default model) and shut down by :meth:`shutdown`.
        **engine_args: Engine options, only used when ``engine`` is None (SGLang's names such
            as ``model_path`` are accepted too).
    """

    def __init__(self, engine: Any = None, **engine_args: Any):
        super().__init__()
        if engine is None:
            import radixlm

            engine = radixlm.Engine(**translate_server_args(engine_args))
            self._owns_engine = True
        elif engine_args:
            raise TypeError("pass either a running engine or engine options, not both")
        else:
            self._owns_engine = False
        self.engine = engine
        self._tokenizer = engine.tokenizer

    def call(self, request: dict[str, Any]) -> Any:
        return self.engine.generate(**_engine_kwargs(request))

    def call_stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.engine.generate(**_engine_kwargs(request))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self._tokenizer.encode(text) for text in texts]

    @property
    def bos_token_id(self) -> int | None:
        ids = self._tokenizer.encode("")
        return ids[0] if ids else None

    def render_chat(self, messages: Messages) -> str:
        if not getattr(self._tokenizer, "chat_template", None):
            raise ChatTemplateError(f"the model {self.engine.model_name!r} has no chat template")
        text = self._tokenizer.apply_chat_template(messages, tokenize=False)
        return strip_bos(text, self._tokenizer.bos_token if self.bos_token_id is not None else None)

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self._tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def flush_cache(self) -> bool:
        """Empty the engine's radix cache (False while requests are running)."""
        return self.engine.flush_cache()

    def get_server_info(self) -> dict:
        """The engine's capacity, cache and queue figures."""
        return self.engine.server_info()

    def shutdown(self) -> None:
        """Shut the engine down if this backend started it."""
        if self._owns_engine:
            self.engine.shutdown()


def _engine_kwargs(request: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(request)
    if "text" in kwargs:
        kwargs["prompt"] = kwargs.pop("text")
    return kwargs
