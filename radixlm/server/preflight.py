"""Size checks that need no engine, and a process that runs them on large bodies.

Parsing and validating a JSON body is one C call that holds the GIL: 0.3-0.6 s for 8 MB of
``input_ids``, long enough to stall every other client even from a worker thread. Bodies above
``PREFLIGHT_BYTES`` are therefore first parsed in a separate process, which answers only whether
the request can be accepted (and the 400 if not): a request too large for the context or the
per-request limits is refused without the server's own process ever parsing it. One that passes
is bounded by those limits and is parsed again in a thread.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from radixlm.server import protocol
from radixlm.server.errors import APIError, validation_message

Model = TypeVar("Model", bound=BaseModel)

# Bodies at least this large are checked in the preflight process first.
PREFLIGHT_BYTES = 512 * 1024
_PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class Bounds:
    """What any request must fit, known without the engine.

    Attributes:
        context_length: the model's context length in tokens.
        max_sequences: most prompts x ``n`` per request.
        max_bytes_per_token: most UTF-8 bytes one token stands for (None: unknown).
    """

    context_length: int
    max_sequences: int
    max_bytes_per_token: int | None = None


def parse_model(model: type[Model], raw: bytes) -> Model:
    """Parse and validate a JSON body against a (strict) model.

    JSON escapes of lone surrogates (``"\\ud800"``) are valid JSON that pydantic's parser
    refuses without naming the field; such a body is parsed by Python's parser instead, so
    that :func:`radixlm.server.protocol.check_values` names the field holding one.

    Raises:
        APIError: 400 naming the first field at fault, or saying why the JSON is malformed.
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = list(exc.errors(include_url=False))
    message = str(errors[0].get("msg")) if errors else ""
    if (
        errors
        and errors[0].get("type") == "json_invalid"
        and ("surrogate" in message or "hex escape" in message)
    ):
        try:
            return model.model_validate(json.loads(raw))
        except ValidationError as exc:
            errors = list(exc.errors(include_url=False))
        except (ValueError, RecursionError):
            pass
    message, param = validation_message(errors)
    raise APIError(400, message, param)


def check_sequences(bounds: Bounds, prompts: int, n: int, param: str) -> None:
    """400 when a request asks for more than ``max_sequences`` prompts x ``n``."""
    if prompts * n > bounds.max_sequences:
        raise APIError(
            400,
            f"the request asks for {prompts} prompt(s) x n={n} = {prompts * n} "
            f"sequences; the server's limit is {bounds.max_sequences} per "
            "request (--max-sequences-per-request)",
            param,
        )


def check_prompt_length(bounds: Bounds, length: int, param: str) -> None:
    """400 for a prompt longer than the context (before anyone walks its ids)."""
    if length > bounds.context_length:
        raise APIError(
            400,
            f"This model's maximum context length is {bounds.context_length} "
            f"tokens; your request has {length} input tokens.",
            param,
        )


def check_text_fits(bounds: Bounds, size: int, param: str) -> None:
    """400 for ``size`` bytes of text that are more tokens than the context whatever their
    tokenization (each token stands for at most ``max_bytes_per_token`` bytes)."""
    per_token = bounds.max_bytes_per_token
    if per_token and size > bounds.context_length * per_token:
        raise APIError(
            400,
            f"This model's maximum context length is {bounds.context_length} "
            f"tokens; your prompt of {size} bytes is longer than that many "
            "tokens can be.",
            param,
        )


def text_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_bounds(body: BaseModel, bounds: Bounds) -> None:
    """The engine-free size checks of a parsed body (prompt counts and lengths).

    Raises:
        APIError: 400 naming the field.
    """
    if isinstance(body, protocol.GenerateRequest):
        _check_prompts(
            bounds,
            body.text if body.text is not None else body.input_ids,
            "text" if body.text is not None else "input_ids",
            1,
        )
    elif isinstance(body, protocol.CompletionRequest):
        _check_prompts(bounds, body.prompt, "prompt", body.n)
    elif isinstance(body, protocol.ChatCompletionRequest):
        check_sequences(bounds, 1, body.n, "n")
        check_text_fits(bounds, sum(text_bytes(_content(m)) for m in body.messages), "messages")
    elif isinstance(body, protocol.DetokenizeRequest):
        check_prompt_length(bounds, len(body.tokens), "tokens")
    elif isinstance(body, protocol.TokenizeRequest):
        text = body.prompt if body.prompt is not None else body.text
        if text is not None:
            check_text_fits(bounds, text_bytes(text), "prompt")


def _content(message: protocol.ChatMessage) -> str:
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text or "" for part in content)
    # stripped: a template may trim what it puts in
    return (content or "").strip()


def _check_prompts(bounds: Bounds, prompts: Any, param: str, n: int) -> None:
    if prompts is None:
        return
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    check_sequences(bounds, len(prompts), n, "n" if n > 1 else param)
    for prompt in prompts:
        if isinstance(prompt, str):
            check_text_fits(bounds, text_bytes(prompt), param)
        else:
            check_prompt_length(bounds, len(prompt), param)


def preflight(model_name: str, raw: bytes, bounds: Bounds) -> tuple[int, str, str | None] | None:
    """Parse, validate and size-check a body (runs in the preflight process).

    Args:
        model_name: the name of the body's model class in :mod:`radixlm.server.protocol`.
        raw: the body.
        bounds: the server's bounds.

    Returns:
        None when the body may be accepted; else ``(status, message, param)`` of its error.
    """
    try:
        body = parse_model(getattr(protocol, model_name), raw)
        check_bounds(body, bounds)
    except APIError as exc:
        return exc.status, exc.message, exc.param
    return None


def _watch_parent(parent: int) -> None:
    """Exit when the server process is gone (so no preflight worker outlives it)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="radixlm-parent-watch").start()


def preflight_pool() -> ProcessPoolExecutor:
    """One worker process for :func:`preflight` (started on first use)."""
    return ProcessPoolExecutor(
        1, mp_context=mp.get_context("spawn"), initializer=_watch_parent, initargs=(os.getpid(),)
    )
