"""What the route modules share: the server context, limits, JSON/SSE encoding, body parsing.

The routes (native_api, openai_api) import from here and never from ``app``, which only
assembles them; so the import arrows point one way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from radixlm.sampling_params import SamplingParamsError, ebnf_to_lark
from radixlm.server.errors import APIError, error_event, from_exception
from radixlm.server.metrics import ServerMetrics
from radixlm.server.preflight import (
    PREFLIGHT_BYTES,
    Bounds,
    check_text_fits,
    parse_model,
    preflight,
    preflight_pool,
    text_bytes,
)
from radixlm.server.runner import Inflight, Runner

logger = logging.getLogger("radixlm.server")

Model = TypeVar("Model", bound=BaseModel)

MiB = 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 4 * MiB
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 256
DEFAULT_MAX_QUEUED_REQUESTS = 1024
DEFAULT_HEADER_TIMEOUT_S = 5.0
DEFAULT_RETRY_AFTER_S = 1
# Threads that parse, validate and tokenize request bodies: the tokenizer releases the GIL, so
# one large prompt never stalls the event loop, and a few of them do not stall small ones.
PARSE_THREADS = 4


@dataclass(frozen=True)
class ServerLimits:
    """The HTTP server's limits (``radixlm serve`` flags; docs/server.md lists their defaults).

    Attributes:
        max_request_bytes: largest request body; beyond it the answer is 413.
        max_sequences_per_request: most prompts x ``n`` one request may ask for (400 beyond).
        max_queued_requests: engine requests allowed to wait beyond the running ones; a request
            that does not fit is answered 429 with ``Retry-After``.
        request_timeout: seconds a request may run before it is aborted (None: no deadline).
        header_timeout: seconds a connection gets to send a request's headers before it is
            closed.
        retry_after: the ``Retry-After`` seconds sent with a 429.
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_sequences_per_request: int = DEFAULT_MAX_SEQUENCES_PER_REQUEST
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    request_timeout: float | None = None
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    retry_after: int = DEFAULT_RETRY_AFTER_S

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_sequences_per_request", "retry_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        for name in ("request_timeout", "header_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive")


# ---- JSON and server-sent events --------------------------------------------------------------


def dumps(obj: Any) -> str:
    """JSON text, with non-finite floats (a -inf logprob) written as null so it stays JSON."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class SafeJSONResponse(JSONResponse):
    """A JSONResponse that writes -inf/nan as null instead of failing."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {dumps(obj)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def stream_error(exc: Exception) -> bytes:
    """An error that happened after the stream started, as an SSE event."""
    try:
        err = from_exception(exc)
    except Exception:
        logger.exception("internal error during a stream")
        return error_event(500, f"internal server error ({type(exc).__name__})")
    return error_event(err.status, err.message, err.param)


# ---- the shared context -----------------------------------------------------------------------


@dataclass
class ServerContext:
    """Everything the route handlers share; one per app (no module-level state).

    Attributes:
        engine: the radixlm Engine being served.
        served_model_name: the name clients pass as ``model``.
        api_key: when set, every route but the probes needs ``Authorization: Bearer <key>``.
        metrics: Prometheus metrics of this server.
        limits: request size, queue and time limits.
        inflight: engine requests currently running.
        runner: submits requests to the engine.
        draining: set on SIGTERM; new requests are answered 503.
        active_requests: HTTP requests being handled right now.
        parse_pool: threads that parse, validate and tokenize bodies.
        bounds: the size checks any request must pass.
        preflight_pool: the process that checks large bodies first (started on first use).
        core_seen: when the engine core last answered (``time.monotonic()``).
        heartbeat: the task that asks the core every second (started by the first /health).
    """

    engine: Any
    served_model_name: str
    api_key: str | None
    metrics: ServerMetrics
    limits: ServerLimits = field(default_factory=ServerLimits)
    inflight: Inflight = field(default_factory=Inflight)
    runner: Runner | None = None
    draining: bool = False
    active_requests: int = 0
    started_at: float = field(default_factory=time.time)
    parse_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(
            PARSE_THREADS, thread_name_prefix="radixlm-parse"
        )
    )
    bounds: Bounds | None = None
    preflight_pool: ProcessPoolExecutor | None = None
    core_seen: float | None = None
    heartbeat: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self.bounds = Bounds(
            self.engine.context_length,
            self.limits.max_sequences_per_request,
            max_bytes_per_token(self.engine.tokenizer),
        )
        running = int(self.engine.startup_info.get("max_running_requests", 0))
        self.runner = Runner(
            self.engine,
            self.metrics,
            self.inflight,
            capacity=running + self.limits.max_queued_requests,
            retry_after=self.limits.retry_after,
            request_timeout=self.limits.request_timeout,
        )

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def shows_paths(self) -> bool:
        """Whether responses may carry this machine's file paths: only behind an API key
        (every caller who got this far authenticated), never to anonymous callers."""
        return bool(self.api_key)

    def public_path(self, path: Any) -> Any:
        """``path`` for a response: the last component unless :attr:`shows_paths`."""
        if self.shows_paths or not isinstance(path, str) or not os.path.isabs(path):
            return path
        return os.path.basename(path.rstrip("/")) or path

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (parsing, validation, tokenization) on the parse threads."""
        return await asyncio.get_running_loop().run_in_executor(self.parse_pool, fn, *args)

    async def preflight(self, model: type[BaseModel], raw: bytes) -> None:
        """Check a large body in the preflight process (see :mod:`radixlm.server.preflight`).

        Raises:
            APIError: the body's 400 (or 413...), found without parsing it in this process.
        """
        if self.preflight_pool is None:
            self.preflight_pool = preflight_pool()
        loop = asyncio.get_running_loop()
        try:
            error = await loop.run_in_executor(
                self.preflight_pool, preflight, model.__name__, raw, self.bounds
            )
        except BrokenProcessPool:  # the worker died (killed?): a new one serves the next body
            logger.warning("the preflight process died; parsing this body in-process")
            self.preflight_pool = None
            return
        if error is not None:
            raise APIError(*error)

    def close(self) -> None:
        """Stop the heartbeat, the parse threads and the preflight process."""
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        self.parse_pool.shutdown(wait=False, cancel_futures=True)
        if self.preflight_pool is not None:
            self.preflight_pool.shutdown(wait=False, cancel_futures=True)

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let running ones finish for ``timeout`` s, then abort the rest."""
        self.draining = True
        if await self.wait_idle(timeout):
            return
        logger.warning("drain timeout: aborting %d running request(s)", len(self.inflight))
        self.runner.abort(self.inflight.rids(), "aborted: the server is shutting down")
        await self.wait_idle(5.0)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no HTTP request is being handled; False if ``timeout`` s pass first."""
        deadline = time.monotonic() + timeout
        while self.active_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active_requests == 0


def get_context(request: Request) -> ServerContext:
    """The ServerContext of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.ctx


# Pre-tokenizers that keep every character of the text (each token covers some of its bytes).
_KEEPING_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts", "Sequence"}
)


def max_bytes_per_token(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes of text one token can stand for, when that is knowable.

    A text of B bytes then has at least B / this tokens, so a prompt that cannot fit the context
    is refused without tokenizing it. Known only for fast tokenizers whose pipeline never
    drops or shrinks text: no normalizer, pre-tokenizers that split without removing, and no
    fused unknown tokens (one of those can stand for any run of characters; with byte fallback
    there are none).

    Args:
        tokenizer: a Hugging Face tokenizer.

    Returns:
        The bound in bytes, or None when the pipeline could shrink the text.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return None
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None or (
        model.get("fuse_unk") and not model.get("byte_fallback")
    ):
        return None
    stack = [spec.get("pre_tokenizer")]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if node.get("type") not in _KEEPING_PRE_TOKENIZERS or node.get("behavior") == "Removed":
            return None
        stack.extend(node.get("pretokenizers") or [])
    # A token's vocabulary string is at least as long in UTF-8 as the text it stands for: the
    # byte-level alphabet spends 1-2 bytes per byte, SentencePiece spends 3 on a space and 6
    # on a fallback byte ("<0x0A>"), an added token is its own text.
    longest = max((len(piece.encode("utf-8")) for piece in tokenizer.get_vocab()), default=0)
    return longest or None


# ---- request bodies ---------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes.

    The gateway already refused a ``Content-Length`` over the limit; this also catches chunked
    bodies and a ``Content-Length`` that lies.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413,
                f"the request body is larger than the server's limit of "
                f"{limit} bytes (--max-request-bytes)",
                code="request_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def validate_json(model: type[Model], raw: bytes) -> Model:
    """Parse and validate a JSON body (strictly typed models; blocking: run it off the loop).

    Raises:
        APIError: 400 naming the first field at fault, or saying why the JSON is malformed.
    """
    return parse_model(model, raw)


async def parse_body(
    request: Request,
    model: type[Model],
    ctx: ServerContext,
    then: Callable[[Model], Any] | None = None,
) -> Any:
    """Read, parse and validate a request body off the event loop.

    Args:
        request: the HTTP request.
        model: the pydantic model of the body.
        ctx: the server context (limits and the parse threads).
        then: more blocking work on the parsed body (checks, tokenization), run on the same
            thread; its result is returned instead of the body.

    Returns:
        The validated body, or ``then(body)``.
    """
    raw = await read_body(request, ctx.limits.max_request_bytes)
    if len(raw) >= PREFLIGHT_BYTES:
        await ctx.preflight(model, raw)

    def work() -> Any:
        body = validate_json(model, raw)
        return body if then is None else then(body)

    return await ctx.off_loop(work)


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` describing a JSON body a route parses itself (for /docs)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# ---- checks shared by the native and OpenAI routes --------------------------------------------


def check_model(ctx: ServerContext, model: str | None) -> None:
    """400 unless ``model`` is omitted or names the served model."""
    if model is not None and model not in (ctx.served_model_name, ctx.engine.model_name):
        raise APIError(
            400,
            f"the model {model!r} does not exist; this server serves {ctx.served_model_name!r}",
            "model",
            "model_not_found",
        )


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """400 unless ``ids`` is a non-empty list of ids in the vocabulary.

    The engine checks this too, but the OpenAI route decodes the ids (for ``echo``) before the
    engine sees them, and an id out of range overflows the tokenizer there.
    """
    if not ids:
        raise APIError(400, f"'{param}' must not contain an empty prompt", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(
            400, f"token id {bad} in '{param}' is outside the vocabulary (size {vocab_size})", param
        )


def encode_prompt(ctx: ServerContext, text: str, param: str, **kwargs: Any) -> list[int]:
    """Token ids of a prompt text (blocking: call it off the loop).

    A text too long to fit the context whatever its tokenization is refused without running
    the tokenizer over all of it (an 8 MB prompt would take tens of seconds).

    Raises:
        APIError: 400, the text cannot fit the context or cannot be tokenized.
    """
    check_text_fits(ctx.bounds, text_bytes(text), param)
    try:
        return list(ctx.tokenizer.encode(text, **kwargs))
    except Exception as exc:  # e.g. a lone surrogate the tokenizer cannot take
        raise APIError(400, f"the prompt cannot be tokenized: {exc}", param) from None


def fan_out(group: str, params: dict[str, Any], max_n: int) -> list[tuple[str, dict[str, Any]]]:
    """``n`` samples become ``n`` requests ``group-0..``, seeds ``seed+i`` (as the engine does).

    Raises:
        APIError: ``n`` is not an integer in [1, max_n].
    """
    n = params.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise APIError(400, f"n must be an integer in [1, {max_n}], got {n!r}", "n")
    base = {k: v for k, v in params.items() if k != "n"}
    if n == 1:
        return [(group, base)]
    seed = base.get("seed")
    out = []
    for i in range(n):
        sample = dict(base)
        if isinstance(seed, int) and not isinstance(seed, bool):
            sample["seed"] = seed + i
        out.append((f"{group}-{i}", sample))
    return out


def check_grammar(ctx: ServerContext, params: dict[str, Any], param: str | None = None) -> None:
    """400 for an EBNF/Lark grammar the server cannot take, before the request is queued.

    Blocking (an EBNF grammar is converted here, once per text): call it off the loop.

    Args:
        ctx: the server context (its engine's grammar backend).
        params: one request's engine sampling fields.
        param: the request field that carries the grammar, for the error (default: the
            engine's, ``ebnf`` or ``lark``).

    Raises:
        APIError: a grammar on a backend other than llguidance, or EBNF that does not convert.
    """
    if params.get("ebnf") is None and params.get("lark") is None:
        return
    param = param or ("ebnf" if params.get("ebnf") is not None else "lark")
    backend = ctx.engine.config.grammar_backend
    if backend != "llguidance":
        raise APIError(
            400,
            f"EBNF/Lark grammars need the llguidance grammar backend; this server runs "
            f"--grammar-backend {backend}",
            param,
        )
    if isinstance(params.get("ebnf"), str):
        try:
            ebnf_to_lark(params["ebnf"])
        except SamplingParamsError as exc:
            raise APIError(400, f"{param}: {str(exc).removeprefix('ebnf: ')}", param) from None


def chat_prompt_ids(
    ctx: ServerContext,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final: bool = False,
) -> list[int]:
    """Apply the tokenizer's chat template and return token ids (BOS as the template puts it).

    Blocking: call it off the loop.

    Raises:
        APIError: the tokenizer has no chat template, or the template rejects the messages.
    """
    tokenizer = ctx.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400, "this model's tokenizer has no chat template; use /v1/completions", "messages"
        )
    # stripped: a template may trim what it puts in
    check_text_fits(
        ctx.bounds,
        sum(text_bytes(str(m.get("content") or "").strip()) for m in messages),
        "messages",
    )
    try:
        out = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt and not continue_final,
            continue_final_message=continue_final,
            tokenize=True,
            return_dict=True,
        )
    except Exception as exc:  # jinja raise_exception, TemplateError, bad roles...
        raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from None
    return list(out["input_ids"])
