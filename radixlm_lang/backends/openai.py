"""Any OpenAI-compatible server (``/v1/completions`` and ``/v1/chat/completions``).

Text outside chat roles is continued with the completions API. A gen at the start of an
assistant message sends the conversation to the chat API, where the *server* applies the model's
chat template; the state's text then shows the conversation in a plain display form
(``role: content``), since the template itself is not available to the client. ``select`` scores
choices with the completions API's prompt logprobs (``echo`` + ``logprobs`` + ``max_tokens=0``);
a server that does not return them gets a clear error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from radixlm_lang.backends.base import (
    Backend,
    BackendError,
    Completion,
    Messages,
    StreamDelta,
)
from radixlm_lang.backends.http_errors import http_error
from radixlm_lang.choices import ChoiceLogprobs
from radixlm_lang.sampling import SamplingParams

# Fields the OpenAI API names differently; the rest are sent under radixlm's (= SGLang's and
# vLLM's extension) names, which servers implementing them understand.
_RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_NOT_SENT = ("return_logprob", "top_logprobs_num", "logprob_start_len", "json_schema",
             "logit_bias")  # fmt: skip


class OpenAI(Backend):
    """An OpenAI-compatible server.

    Called as SGLang does: ``OpenAI("model-name", base_url=..., api_key=...)``.

    Args:
        model_name: the model name to send (``model=`` is accepted too).
        base_url: the API root including ``/v1`` (default: ``$OPENAI_BASE_URL``, else
            ``https://api.openai.com/v1``).
        api_key: bearer token (default: ``$OPENAI_API_KEY``; none: no Authorization header).
        is_chat_model: False sends everything to the completions API (no chat messages);
            None/True sends a gen that starts an assistant message to the chat API.
        timeout: seconds per request.
        model: another spelling of ``model_name``.
    """

    def __init__(
        self,
        model_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        is_chat_model: bool | None = None,
        timeout: float | None = 600.0,
        model: str | None = None,
    ):
        super().__init__()
        if model_name and model and model_name != model:
            raise TypeError(f"model_name={model_name!r} and model={model!r} disagree")
        model = model_name or model
        if not model:
            raise ValueError("OpenAI backend needs the model name: OpenAI('model-name', ...)")
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.uses_chat_messages = is_chat_model is not False
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def get_model_name(self) -> str:
        """The model name sent with every request."""
        return self.model

    # ---- Backend ----

    def generate(
        self, prompt: str, params: SamplingParams, messages: Messages | None = None
    ) -> Completion:
        if messages is not None:
            body = self._post("/chat/completions", self._chat_body(messages, params))
            choice = body["choices"][0]
            return Completion(choice["message"].get("content") or "", _meta(body, choice))
        body = self._post("/completions", self._completion_body(prompt, params))
        choice = body["choices"][0]
        return Completion(choice["text"], _meta(body, choice))

    def generate_stream(
        self, prompt: str, params: SamplingParams, messages: Messages | None = None
    ) -> Iterator[StreamDelta]:
        if messages is not None:
            path, body = "/chat/completions", self._chat_body(messages, params)
        else:
            path, body = "/completions", self._completion_body(prompt, params)
        body.update(stream=True, stream_options={"include_usage": True})
        finish, usage = None, None
        for event in self._stream(path, body):
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
                if text:
                    yield StreamDelta(text)
        yield StreamDelta("", _meta({"usage": usage}, {"finish_reason": finish}))

    def cache_prefix(self, prompt: str) -> dict[str, Any]:
        body = self._post("/completions", {"model": self.model, "prompt": prompt, "max_tokens": 0})
        return _meta(body, body["choices"][0])

    def score_choices(
        self, prompt: str, choices: Sequence[str], unconditional: bool = False
    ) -> ChoiceLogprobs:
        self.cache_prefix(prompt)
        rows = self._echo_logprobs([prompt + c for c in choices], choices)
        uncond = None
        if unconditional:
            uncond = tuple(tuple(lp for _, lp in self._echo_logprobs([c], [c])[0]) for c in choices)
        return ChoiceLogprobs(
            choices=tuple(choices),
            token_ids=tuple(tuple(range(len(r))) for r in rows),  # ids are not in this API
            token_logprobs=tuple(tuple(lp for _, lp in r) for r in rows),
            unconditional_logprobs=uncond,
            token_texts=tuple(tuple(token for token, _ in r) for r in rows),
        )

    def render_chat(self, messages: Messages) -> str:
        # Display form only: the server applies the real template to the messages.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)

    def shutdown(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    # ---- requests ----

    def _completion_body(self, prompt: str, params: SamplingParams) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, **_openai_params(params)}
        if params.return_logprob:
            body["logprobs"] = params.top_logprobs_num or 0
        return body

    def _chat_body(self, messages: Messages, params: SamplingParams) -> dict[str, Any]:
        body = {"model": self.model, "messages": messages, **_openai_params(params)}
        if params.return_logprob:
            body["logprobs"] = True
            if params.top_logprobs_num:
                body["top_logprobs"] = params.top_logprobs_num
        return body

    def _echo_logprobs(
        self, prompts: list[str], tails: Sequence[str]
    ) -> list[list[tuple[str, float]]]:
        """Per prompt, (token, logprob) of the tokens that cover its ``tail``."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True,
                "logprobs": 0, "temperature": 0}  # fmt: skip
        try:
            response = self._post("/completions", body)
        except BackendError as exc:
            raise BackendError(f"{_NO_LOGPROBS}: {exc}", exc.status) from exc
        by_index = sorted(response["choices"], key=lambda c: c.get("index", 0))
        return [_tail_tokens(choice.get("logprobs"), tail) for choice, tail in zip(by_index, tails)]

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"POST {self.base_url}{path} failed: {exc}") from exc
        if response.status_code >= 400:
            raise http_error(response)
        return response.json()

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise http_error(response)
            for line in response.iter_lines():
                payload = line[len("data:") :].strip() if line.startswith("data:") else ""
                if payload == "[DONE]":
                    return
                if payload:
                    event = json.loads(payload)
                    if "error" in event:
                        raise BackendError(f"server error: {event['error']}")
                    yield event


_NO_LOGPROBS = (
    "select needs prompt-token logprobs (completions with echo=true, logprobs, max_tokens=0), "
    "which this OpenAI-compatible server does not provide"
)


def _openai_params(params: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in params.sampling_dict().items():
        if name in _NOT_SENT:
            continue
        out[_RENAMED.get(name, name)] = value
    if params.json_schema is not None:
        schema = json.loads(params.json_schema)
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "output", "schema": schema}}  # fmt: skip
    if params.logit_bias:
        out["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    return out


def _tail_tokens(logprobs: Any, tail: str) -> list[tuple[str, float]]:
    """The last tokens of an echoed prompt whose text covers ``tail`` (the choice).

    Offsets differ between servers (some count a BOS string), so tokens are taken from the end
    until their text is at least as long as the tail; a token straddling the boundary counts.
    """
    if not logprobs or not logprobs.get("tokens") or not logprobs.get("token_logprobs"):
        raise BackendError(_NO_LOGPROBS)
    tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
    picked: list[tuple[str, float]] = []
    covered = 0
    for token, value in zip(reversed(tokens), reversed(values)):
        if covered >= len(tail):
            break
        if value is None:
            raise BackendError(f"the server gave no logprob for token {token!r} of {tail!r}")
        picked.append((token, float(value)))
        covered += len(token)
    return picked[::-1]


def _meta(body: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    finish = choice.get("finish_reason")
    return {
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "finish_reason": None if finish is None else {"type": finish},
        "logprobs": choice.get("logprobs"),
    }
