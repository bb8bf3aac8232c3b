"""Native routes: /generate (SGLang's request shape) and the operational endpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from radixlm.server.app import SSE_DONE, ServerContext, get_context, sse
from radixlm.server.errors import APIError, error_event, from_exception
from radixlm.server.metrics import CONTENT_TYPE
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
HEALTH_GENERATE_TIMEOUT_S = 60.0


# ---- /generate --------------------------------------------------------------------------------


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request,
                   ctx: ServerContext = Depends(get_context)) -> Any:
    """Native generation; the response is the engine's result dict (a list for batches/n>1)."""
    jobs, single = native_jobs(body, ctx)  # first: it names sampling fields as the engine does
    check_values(body)
    if body.stream:
        streams = await ctx.runner.open_streams(jobs, request)
        events = _native_events(ctx, jobs, streams, tag_index=len(jobs) > 1)
        return StreamingResponse(events, media_type="text/event-stream")
    results = await ctx.runner.collect(jobs, request)
    return results[0] if single else results


def native_jobs(body: GenerateRequest, ctx: ServerContext) -> tuple[list[Job], bool]:
    """Split a native request into single-sample engine jobs, prompt-major.

    Returns:
        The jobs and whether the request was a single prompt with n == 1.
    """
    prompts, single_prompt = _native_prompts(body, ctx)
    params_list = _per_prompt(body.sampling_params, len(prompts), "sampling_params", {})
    vocab = ctx.engine.vocab_size
    params_list = [native_sampling_params(params or {}, vocab) for params in params_list]
    groups = _per_prompt(body.rid, len(prompts), "rid", None)
    common = {"return_logprob": body.return_logprob, "top_logprobs_num": body.top_logprobs_num,
              "logprob_start_len": body.logprob_start_len}
    jobs: list[Job] = []
    for prompt, params, group in zip(prompts, params_list, groups):
        group = group or new_rid()
        for rid, sample_params in fan_out(group, params or {}):
            if ctx.inflight.rids(rid):
                raise APIError(400, f"request id {rid!r} is already in use", "rid")
            jobs.append(Job(rid, group, {**prompt, "sampling_params": sample_params, **common}))
    return jobs, single_prompt and len(jobs) == 1


def _native_prompts(body: GenerateRequest, ctx: ServerContext
                    ) -> tuple[list[dict[str, Any]], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of 'text' or 'input_ids'", "text")
    if body.text is not None:
        texts = [body.text] if isinstance(body.text, str) else body.text
        _non_empty(texts, "text")
        # "" is a prompt only where the tokenizer adds a BOS; zero tokens would reach the engine
        if "" in texts and not ctx.tokenizer.encode(""):
            raise APIError(400, "'text' must not be empty", "text")
        return [{"prompt": t} for t in texts], isinstance(body.text, str)
    ids = body.input_ids
    batch = [ids] if ids and isinstance(ids[0], int) else ids
    _non_empty(batch, "input_ids")
    for prompt_ids in batch:
        check_token_ids(prompt_ids, ctx.engine.vocab_size, "input_ids")
    return [{"input_ids": list(b)} for b in batch], batch is not ids


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """400 unless ``ids`` is a non-empty list of ids in the vocabulary.

    The engine checks this too, but the OpenAI route decodes the ids (for ``echo``) before the
    engine sees them, and an id out of range overflows the tokenizer there.
    """
    if not ids:
        raise APIError(400, f"'{param}' must not contain an empty prompt", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} in '{param}' is outside the vocabulary "
                            f"(size {vocab_size})", param)


def _non_empty(items: list, param: str) -> None:
    if not items:
        raise APIError(400, f"'{param}' must not be an empty list", param)


def _per_prompt(value: Any, count: int, param: str, default: Any) -> list[Any]:
    if not isinstance(value, list):
        return [default if value is None else value] * count
    if len(value) != count:
        raise APIError(400, f"{len(value)} {param} entries for {count} prompts", param)
    return value


def fan_out(group: str, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``n`` samples become ``n`` requests ``group-0..``, seeds ``seed+i`` (as the engine does).

    Raises:
        APIError: ``n`` is not an integer in [1, MAX_N].
    """
    n = params.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be an integer in [1, {MAX_N}], got {n!r}", "n")
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


async def _native_events(ctx: ServerContext, jobs: list[Job], streams: list,
                         tag_index: bool) -> AsyncIterator[bytes]:
    try:
        async for index, chunk in ctx.runner.merge(jobs, streams):
            if tag_index:
                chunk = {**chunk, "index": index}
            yield sse(chunk)
    except Exception as exc:
        yield stream_error(exc)
    yield SSE_DONE


def stream_error(exc: Exception) -> bytes:
    """An error that happened after the stream started, as an SSE event."""
    try:
        err = from_exception(exc)
    except Exception:
        logger.exception("internal error during a stream")
        return error_event(500, f"internal server error ({type(exc).__name__})")
    return error_event(err.status, err.message, err.param)


# ---- operational routes -----------------------------------------------------------------------


@router.get("/health")
async def health(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """200 while the engine core answers; 503 when it is gone or the server is draining."""
    await _engine_call(ctx.engine.server_info, HEALTH_TIMEOUT_S)
    return {"status": "ok"}


@router.get("/health_generate")
async def health_generate(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Run a one-token greedy generation end to end; 503 if it fails."""
    token = ctx.tokenizer.bos_token_id
    job = Job(new_rid("health-"), "health", {
        "input_ids": [token if token is not None else 0],
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
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
        raise APIError(503, f"the engine is not responding: {exc or type(exc).__name__}",
                       code="engine_unavailable") from exc


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
        raise APIError(409, "cannot flush the cache while requests are running; retry when idle",
                       code="requests_running")
    return {"success": True, "message": "cache flushed"}


@router.get("/server_info")
async def server_info(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Engine figures (KV capacity/free, cache, queue) plus the server's own settings."""
    info = dict(await _engine_call(ctx.engine.server_info, HEALTH_TIMEOUT_S))
    info.setdefault("model_path", ctx.engine.config.model.model)
    info.setdefault("context_length", ctx.engine.context_length)
    info.setdefault("config", ctx.engine.config.flat())
    info.update({"served_model_name": ctx.served_model_name,
                 "inflight_requests": len(ctx.inflight), "draining": ctx.draining,
                 "version": _version()})
    return info


def _version() -> str:
    from radixlm import __version__

    return __version__


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, ctx: ServerContext = Depends(get_context)
                   ) -> dict[str, Any]:
    """Token ids of a text (``prompt``/``text``) or of chat ``messages`` after the template."""
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
        ids = ctx.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.engine.context_length}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, ctx: ServerContext = Depends(get_context)
                     ) -> dict[str, Any]:
    """Text of a list of token ids."""
    check_values(body)
    check_model(ctx, body.model)
    vocab = len(ctx.tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (size {vocab})", "tokens")
    text = ctx.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)
    return {"text": text}


@router.post("/abort")
async def abort(body: AbortRequest, ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Abort one request (by the ``rid`` the client gave or got back) or every request."""
    check_values(body)
    if body.abort_all:
        rids = ctx.inflight.rids()
    elif body.rid:
        rids = ctx.inflight.rids(body.rid) or [body.rid]
    else:
        raise APIError(400, "give 'rid' or 'abort_all': true", "rid")
    ctx.runner.abort(rids)
    return {"success": True, "rids": rids}


# ---- shared with the OpenAI routes ------------------------------------------------------------


def check_model(ctx: ServerContext, model: str | None) -> None:
    """400 unless ``model`` is omitted or names the served model."""
    if model is not None and model not in (ctx.served_model_name, ctx.engine.model_name):
        raise APIError(400, f"the model {model!r} does not exist; this server serves "
                            f"{ctx.served_model_name!r}", "model", "model_not_found")


def chat_prompt_ids(ctx: ServerContext, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True, continue_final: bool = False
                    ) -> list[int]:
    """Apply the tokenizer's chat template and return token ids (BOS as the template puts it).

    Raises:
        APIError: the tokenizer has no chat template, or the template rejects the messages.
    """
    tokenizer = ctx.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       "messages")
    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt and not continue_final,
            continue_final_message=continue_final, tokenize=True, return_dict=True)
    except Exception as exc:  # jinja raise_exception, TemplateError, bad roles...
        raise APIError(400, f"the chat template rejected the messages: {exc}",
                       "messages") from None
    return list(out["input_ids"])
