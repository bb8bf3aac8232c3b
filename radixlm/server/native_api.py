"""Native routes: /generate (SGLang's request shape) and the operational endpoints."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from radixlm.server.common import (
    SSE_DONE,
    ServerContext,
    body_doc,
    chat_prompt_ids,
    check_grammar,
    check_model,
    check_token_ids,
    encode_prompt,
    fan_out,
    get_context,
    parse_body,
    sse,
    stream_error,
)
from radixlm.server.errors import APIError
from radixlm.server.metrics import CONTENT_TYPE
from radixlm.server.preflight import check_prompt_length, check_sequences
from radixlm.server.protocol import (
    MAX_N,
    AbortRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
    check_values,
    message_dicts,
    native_sampling_params,
)
from radixlm.server.runner import Job, new_rid

logger = logging.getLogger("radixlm.server")
router = APIRouter()

HEALTH_TIMEOUT_S = 10.0
HEARTBEAT_S = 1.0
HEALTH_GENERATE_TIMEOUT_S = 60.0


# ---- /generate --------------------------------------------------------------------------------


@router.post("/generate", openapi_extra=body_doc(GenerateRequest))
async def generate(request: Request, ctx: ServerContext = Depends(get_context)) -> Any:
    """Native generation; the response is the engine's result dict (a list for batches/n>1)."""
    body, jobs, single = await parse_body(
        request, GenerateRequest, ctx, lambda b: (b, *native_jobs(b, ctx))
    )
    check_groups_free(ctx, jobs)
    if body.stream:
        streams = await ctx.runner.open_streams(jobs, request)
        events = _native_events(ctx, jobs, streams, tag_index=len(jobs) > 1)
        return StreamingResponse(events, media_type="text/event-stream")
    results = await ctx.runner.collect(jobs, request)
    return results[0] if single else results


def native_jobs(body: GenerateRequest, ctx: ServerContext) -> tuple[list[Job], bool]:
    """Split a native request into single-sample engine jobs, prompt-major (blocking: it
    tokenizes; run it off the loop).

    Returns:
        The jobs and whether the request was a single prompt with n == 1.
    """
    prompts, single_prompt = _native_prompts(body, ctx)
    params_list = _per_prompt(body.sampling_params, len(prompts), "sampling_params", {})
    vocab = ctx.engine.vocab_size
    # first: it names sampling fields as the engine does
    params_list = [native_sampling_params(params or {}, vocab) for params in params_list]
    for params in params_list:
        check_grammar(ctx, params)
    check_values(body)
    groups = _per_prompt(body.rid, len(prompts), "rid", None)
    ns = [params.get("n", 1) for params in params_list]
    if all(isinstance(n, int) and not isinstance(n, bool) for n in ns):
        check_sequences(ctx.bounds, len(prompts), max(ns), "sampling_params.n")
    common = {
        "return_logprob": body.return_logprob,
        "top_logprobs_num": body.top_logprobs_num,
        "logprob_start_len": body.logprob_start_len,
        "return_text_in_logprobs": body.return_text_in_logprobs,
    }
    jobs: list[Job] = []
    for prompt, params, group in zip(prompts, params_list, groups):
        group = group or new_rid()
        for rid, sample_params in fan_out(group, params or {}, MAX_N):
            jobs.append(Job(rid, group, {**prompt, "sampling_params": sample_params, **common}))
    return jobs, single_prompt and len(jobs) == 1


def check_groups_free(ctx: ServerContext, jobs: list[Job]) -> None:
    """400 when the id a client chose names a request that is still running (on the loop: it
    reads the in-flight table, which only the loop changes)."""
    for group in dict.fromkeys(job.group for job in jobs):
        if ctx.inflight.rids(group):
            raise APIError(400, f"request id {group!r} is already in use", "rid")


def _native_prompts(body: GenerateRequest, ctx: ServerContext) -> tuple[list[dict[str, Any]], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of 'text' or 'input_ids'", "text")
    if body.text is not None:
        texts = [body.text] if isinstance(body.text, str) else body.text
        _non_empty(texts, "text")
        check_sequences(ctx.bounds, len(texts), 1, "text")
        prompts = []
        for text in texts:
            ids = encode_prompt(ctx, text, "text")
            # "" is a prompt only where the tokenizer adds a BOS
            if not ids:
                raise APIError(400, "'text' must not be empty", "text")
            check_prompt_length(ctx.bounds, len(ids), "text")
            prompts.append({"input_ids": ids})
        return prompts, isinstance(body.text, str)
    ids = body.input_ids
    batch = [ids] if ids and isinstance(ids[0], int) else ids
    _non_empty(batch, "input_ids")
    check_sequences(ctx.bounds, len(batch), 1, "input_ids")
    for prompt_ids in batch:
        check_prompt_length(ctx.bounds, len(prompt_ids), "input_ids")
        check_token_ids(prompt_ids, ctx.engine.vocab_size, "input_ids")
    return [{"input_ids": list(b)} for b in batch], batch is not ids


def _non_empty(items: list, param: str) -> None:
    if not items:
        raise APIError(400, f"'{param}' must not be an empty list", param)


def _per_prompt(value: Any, count: int, param: str, default: Any) -> list[Any]:
    if not isinstance(value, list):
        return [default if value is None else value] * count
    if len(value) != count:
        raise APIError(400, f"{len(value)} {param} entries for {count} prompts", param)
    return value


async def _native_events(
    ctx: ServerContext, jobs: list[Job], streams: list, tag_index: bool
) -> AsyncIterator[bytes]:
    try:
        async for index, chunk in ctx.runner.merge(jobs, streams):
            if tag_index:
                chunk = {**chunk, "index": index}
            yield sse(chunk)
    except Exception as exc:
        yield stream_error(exc)
    yield SSE_DONE


# ---- operational routes -----------------------------------------------------------------------


@router.get("/health")
async def health(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """200 while the engine core answers; 503 when it is gone or the server is draining.

    The core is asked by a heartbeat in the background (every ``HEARTBEAT_S``), not by each
    probe: a probe answers at once, however busy the core's steps are, and still turns 503 when
    the core has died or has not answered for ``HEALTH_TIMEOUT_S``.
    """
    if ctx.engine.dead_reason is not None:
        raise APIError(503, f"the engine has stopped: {ctx.engine.dead_reason}", code="engine_dead")
    if ctx.heartbeat is None or ctx.heartbeat.done():
        ctx.heartbeat = asyncio.create_task(_heartbeat(ctx))
    if ctx.core_seen is None:  # the first probe waits for the first answer
        await _engine_call(ctx.engine.server_info, HEALTH_TIMEOUT_S)
        ctx.core_seen = time.monotonic()
    silent = time.monotonic() - ctx.core_seen
    if silent > HEALTH_TIMEOUT_S:
        raise APIError(
            503,
            f"the engine is not responding (no answer for {silent:.0f} s)",
            code="engine_unavailable",
        )
    return {"status": "ok"}


async def _heartbeat(ctx: ServerContext) -> None:
    """Ask the core for its figures every ``HEARTBEAT_S``; note when it last answered."""
    while ctx.engine.dead_reason is None:
        try:
            await _engine_call(ctx.engine.server_info, HEALTH_TIMEOUT_S)
            ctx.core_seen = time.monotonic()
        except APIError:
            pass  # /health reports the silence once it lasts
        await asyncio.sleep(HEARTBEAT_S)


@router.get("/health_generate")
async def health_generate(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Run a one-token greedy generation end to end; 503 if it fails."""
    token = ctx.tokenizer.bos_token_id
    job = Job(
        new_rid("health-"),
        "health",
        {
            "input_ids": [token if token is not None else 0],
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        },
    )
    try:
        await asyncio.wait_for(ctx.runner.collect([job], None), HEALTH_GENERATE_TIMEOUT_S)
    except Exception as exc:
        ctx.runner.abort([job.rid])
        raise APIError(503, f"health generation failed: {exc or type(exc).__name__}") from exc
    return {"status": "ok"}


async def _engine_call(fn: Any, timeout: float) -> Any:
    """Run a blocking engine control call off the event loop; 503 if the core does not answer."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), timeout)
    except Exception as exc:
        raise APIError(
            503,
            f"the engine is not responding: {exc or type(exc).__name__}",
            code="engine_unavailable",
        ) from exc


@router.get("/metrics")
async def metrics(ctx: ServerContext = Depends(get_context)) -> Response:
    """Prometheus text format."""
    try:
        ctx.metrics.refresh(await _engine_call(ctx.engine.server_info, HEALTH_TIMEOUT_S))
    except APIError:
        logger.warning("metrics: engine figures unavailable; serving counters only")
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


@router.post("/flush_cache")
async def flush_cache(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Empty the radix cache; 409 while requests are running."""
    if not await _engine_call(ctx.engine.flush_cache, 60.0):
        raise APIError(
            409,
            "cannot flush the cache while requests are running; retry when idle",
            code="requests_running",
        )
    return {"success": True, "message": "cache flushed"}


@router.get("/server_info")
async def server_info(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Engine figures (KV capacity/free, cache, queue) plus the server's own settings."""
    info = dict(await _engine_call(ctx.engine.server_info, HEALTH_TIMEOUT_S))
    info.setdefault("model_path", ctx.engine.config.model.model)
    info.setdefault("context_length", ctx.engine.context_length)
    info.setdefault("config", ctx.engine.config.flat())
    # file paths only behind an API key: an anonymous caller learns nothing of the filesystem
    info["model_path"] = ctx.public_path(info["model_path"])
    info["config"] = {k: ctx.public_path(v) for k, v in dict(info["config"]).items()}
    limits = ctx.limits
    info.update(
        {
            "served_model_name": ctx.served_model_name,
            "inflight_requests": len(ctx.inflight),
            "draining": ctx.draining,
            "version": _version(),
            "server_limits": {
                "max_request_bytes": limits.max_request_bytes,
                "max_sequences_per_request": limits.max_sequences_per_request,
                "max_queued_requests": limits.max_queued_requests,
                "request_timeout": limits.request_timeout,
                "header_timeout": limits.header_timeout,
            },
        }
    )
    return info


def _version() -> str:
    from radixlm import __version__

    return __version__


@router.post("/tokenize", openapi_extra=body_doc(TokenizeRequest))
async def tokenize(request: Request, ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Token ids of a text (``prompt``/``text``) or of chat ``messages`` after the template."""
    return await parse_body(request, TokenizeRequest, ctx, lambda body: _tokenize(body, ctx))


def _tokenize(body: TokenizeRequest, ctx: ServerContext) -> dict[str, Any]:
    check_values(body)
    check_model(ctx, body.model)
    if body.prompt is not None and body.text is not None:
        raise APIError(400, "give 'prompt' or its alias 'text', not both", "text")
    text = body.prompt if body.prompt is not None else body.text
    if (text is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' (or 'text') or 'messages'", "prompt")
    if body.messages is not None:
        ids = chat_prompt_ids(ctx, message_dicts(body.messages), body.add_generation_prompt)
    else:
        ids = encode_prompt(ctx, text, "prompt", add_special_tokens=body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.engine.context_length}


@router.post("/detokenize", openapi_extra=body_doc(DetokenizeRequest))
async def detokenize(request: Request, ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Text of a list of token ids."""
    return await parse_body(request, DetokenizeRequest, ctx, lambda body: _detokenize(body, ctx))


def _detokenize(body: DetokenizeRequest, ctx: ServerContext) -> dict[str, Any]:
    check_prompt_length(ctx.bounds, len(body.tokens), "tokens")  # no longer than a context
    check_values(body)
    check_model(ctx, body.model)
    vocab = len(ctx.tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (size {vocab})", "tokens")
    text = ctx.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)
    return {"text": text}


@router.post("/abort", openapi_extra=body_doc(AbortRequest))
async def abort(request: Request, ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Abort one request, by the exact ``rid`` the client gave (every job of that request) or
    got back (one job), or every request. Ids are never matched by prefix.

    ``success`` is false when no running request has that id (it finished, or never existed).
    """
    body = await parse_body(request, AbortRequest, ctx)
    check_values(body)
    if body.abort_all:
        rids = ctx.inflight.rids()
    elif body.rid:
        rids = ctx.inflight.rids(body.rid)
    else:
        raise APIError(400, "give 'rid' or 'abort_all': true", "rid")
    ctx.runner.abort(rids)
    return {"success": bool(rids) or body.abort_all, "rids": rids}
