"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Each route turns its request into engine jobs (one per prompt and sample, prompt-major, so the
job index is the choice index), runs them, and shapes the engine results the way the official
``openai`` client expects. The shaping functions are pure and unit-tested on their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from radixlm.engine.errors import RequestError
from radixlm.sampling_params import CONSTRAINT_FIELDS
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
from radixlm.server.preflight import check_prompt_length, check_sequences
from radixlm.server.protocol import (
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    check_values,
    completion_max_tokens,
    constraint_param,
    max_tokens_field,
    message_dicts,
    openai_param,
    sampling_params,
)
from radixlm.server.runner import Job, new_rid

router = APIRouter()


# ---- /v1/models -------------------------------------------------------------------------------


def model_card(ctx: ServerContext) -> dict[str, Any]:
    return {
        "id": ctx.served_model_name,
        "object": "model",
        "created": int(ctx.started_at),
        "owned_by": "radixlm",
        "root": ctx.public_path(ctx.engine.config.model.model),
        "max_model_len": ctx.engine.context_length,
    }


@router.get("/v1/models")
async def list_models(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """The one model this server serves."""
    return {"object": "list", "data": [model_card(ctx)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(
    model_id: str, ctx: ServerContext = Depends(get_context)
) -> dict[str, Any]:
    """The model card, or 404 for any other name."""
    if model_id != ctx.served_model_name:
        raise APIError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
    return model_card(ctx)


# ---- shared request plumbing ------------------------------------------------------------------


@dataclass
class Plan:
    """An OpenAI request resolved into engine jobs.

    Attributes:
        id: the response id (``cmpl-...`` / ``chatcmpl-...``).
        jobs: one per choice, in choice order.
        prompt_ids: token ids of each prompt.
        prompt_texts: each prompt's text (for ``echo``).
        n: samples per prompt.
    """

    id: str
    jobs: list[Job]
    prompt_ids: list[list[int]]
    prompt_texts: list[str] = field(default_factory=list)
    n: int = 1
    created: int = field(default_factory=lambda: int(time.time()))


def _build_jobs(
    group: str,
    prompt_ids: list[list[int]],
    params: list[dict[str, Any]],
    n: int,
    logprob: dict[str, Any],
) -> list[Job]:
    jobs = []
    for index, (ids, sample_params) in enumerate(zip(prompt_ids, params)):
        prompt_group = group if len(prompt_ids) == 1 else f"{group}-p{index}"
        for rid, one in fan_out(prompt_group, {**sample_params, "n": n}, MAX_N):
            jobs.append(Job(rid, group, {"input_ids": ids, "sampling_params": one, **logprob}))
    return jobs


def _default_budget(ctx: ServerContext, prompt_len: int) -> int:
    """Output budget when the client sets none: whatever fits the context and the KV pool."""
    limit = min(ctx.engine.context_length, ctx.engine.kv_capacity_tokens)
    return max(limit - prompt_len, 1)


def _openai_error(exc: RequestError, body: CompletionRequest | ChatCompletionRequest) -> APIError:
    param = openai_param(exc.param, max_tokens_field(body))
    # an invalid constraint: name the field the client gave it in (guided_grammar for ebnf...)
    if param in (*CONSTRAINT_FIELDS, "sampling_params"):
        param = constraint_param(body) or param
    if isinstance(body, ChatCompletionRequest) and param == "prompt":
        param = "messages"
    return APIError(400, exc.message, param)


def _check_common(body: CompletionRequest | ChatCompletionRequest, ctx: ServerContext) -> None:
    check_values(body)
    body.reject_unsupported()
    check_model(ctx, body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported (only best_of == n)", "best_of")


def _check_rid_free(body: CompletionRequest | ChatCompletionRequest, ctx: ServerContext) -> None:
    """On the loop: the in-flight table is only read where it changes."""
    if body.rid is not None and ctx.inflight.rids(body.rid):
        raise APIError(400, f"request id {body.rid!r} is already in use", "rid")


async def _run(
    ctx: ServerContext,
    plan: Plan,
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
) -> Any:
    try:
        if body.stream:
            return await ctx.runner.open_streams(plan.jobs, request)
        return await ctx.runner.collect(plan.jobs, request)
    except RequestError as exc:
        raise _openai_error(exc, body) from None


# ---- /v1/completions --------------------------------------------------------------------------


@router.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
async def completions(request: Request, ctx: ServerContext = Depends(get_context)) -> Any:
    """OpenAI text completions (batch prompts, n, echo, logprobs, streaming)."""

    def prepare(body: CompletionRequest) -> tuple[CompletionRequest, Plan]:
        _check_common(body, ctx)
        return body, completion_plan(body, ctx)

    body, plan = await parse_body(request, CompletionRequest, ctx, prepare)
    _check_rid_free(body, ctx)
    outcome = await _run(ctx, plan, request, body)
    if body.stream:
        return _event_stream(_completion_events, ctx, plan, body, outcome)
    return completion_response(plan, outcome, ctx.served_model_name, body.echo, body.logprobs)


def _event_stream(make_events, ctx: ServerContext, plan, body, outcome) -> StreamingResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = make_events(ctx, plan, body, outcome, include_usage)
    return StreamingResponse(events, media_type="text/event-stream")


def completion_plan(body: CompletionRequest, ctx: ServerContext) -> Plan:
    """Tokenize the prompt(s) and build one job per choice (blocking: run it off the loop)."""
    prompt_ids, texts = _completion_prompts(body.prompt, ctx, body.n)
    max_tokens = completion_max_tokens(body)
    vocab = ctx.engine.vocab_size
    params = [
        sampling_params(
            body, max_tokens if max_tokens is not None else _default_budget(ctx, len(ids)), vocab
        )
        for ids in prompt_ids
    ]
    check_grammar(ctx, params[0], constraint_param(body))
    want = body.logprobs is not None
    logprob = {
        "return_logprob": want,
        "top_logprobs_num": body.logprobs or 0,
        "logprob_start_len": 0 if (want and body.echo) else -1,
    }
    group = body.rid or new_rid("cmpl-")
    return Plan(
        group, _build_jobs(group, prompt_ids, params, body.n, logprob), prompt_ids, texts, body.n
    )


def _completion_prompts(
    prompt: Any, ctx: ServerContext, n: int
) -> tuple[list[list[int]], list[str]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    check_sequences(ctx.bounds, len(prompt), n, "n" if n > 1 else "prompt")
    tokenizer, vocab_size = ctx.tokenizer, ctx.engine.vocab_size
    ids, texts = [], []
    for item in prompt:
        if isinstance(item, str):
            ids.append(encode_prompt(ctx, item, "prompt"))
            texts.append(item)
        else:
            check_prompt_length(ctx.bounds, len(item), "prompt")
            check_token_ids(item, vocab_size, "prompt")
            ids.append(list(item))
            texts.append(tokenizer.decode(item))
        check_prompt_length(ctx.bounds, len(ids[-1]), "prompt")
    if any(not i for i in ids):
        raise APIError(400, "prompt must not be empty", "prompt")
    return ids, texts


def completion_response(
    plan: Plan, results: list[dict[str, Any]], model: str, echo: bool, logprobs: int | None
) -> dict[str, Any]:
    """The ``text_completion`` object for finished results (one per choice)."""
    choices = []
    for index, result in enumerate(results):
        prompt_text = plan.prompt_texts[index // plan.n]
        choices.append(
            {
                "index": index,
                "text": (prompt_text if echo else "") + result["text"],
                "logprobs": (
                    completion_logprobs(result["meta_info"], echo, len(prompt_text))
                    if logprobs is not None
                    else None
                ),
                "finish_reason": finish_reason(result["meta_info"]),
                "matched_stop": matched_stop(result["meta_info"]),
            }
        )
    return {
        "id": plan.id,
        "object": "text_completion",
        "created": plan.created,
        "model": model,
        "choices": choices,
        "usage": usage(results, plan.n),
        "system_fingerprint": None,
    }


def completion_logprobs(
    meta: dict[str, Any], echo: bool, prompt_chars: int, start: int = 0, offset: int | None = None
) -> dict[str, Any]:
    """Legacy logprobs: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset``.

    Offsets count characters from the start of the prompt: echoed prompt tokens from 0, output
    tokens from the end of the prompt text.

    Args:
        meta: the engine result's ``meta_info``.
        echo: include the prompt's tokens first.
        prompt_chars: length of the prompt text.
        start: skip this many output tokens (already sent in earlier stream chunks).
        offset: text offset of the first output token sent now (streaming); default
            ``prompt_chars``.
    """
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    if echo:
        _append_logprobs(
            out, meta.get("input_token_logprobs", []), meta.get("input_top_logprobs", []), 0
        )
    _append_logprobs(
        out,
        list(meta.get("output_token_logprobs", []))[start:],
        list(meta.get("output_top_logprobs", []))[start:],
        prompt_chars if offset is None else offset,
    )
    return out


def _append_logprobs(out: dict[str, Any], entries: list, tops: list, position: int) -> None:
    for i, (logprob, _token_id, text) in enumerate(entries):
        if _has_logprob(logprob):  # see has_logprob: the rest are left out, offsets kept
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            top = _finite_top(tops[i] if i < len(tops) else None)
            out["top_logprobs"].append({t: lp for lp, _, t in top} if top else None)
            out["text_offset"].append(position)
        position += len(text)


def _has_logprob(logprob: float | None) -> bool:
    """Whether a token has a logprob of the model to report.

    Tokens a grammar forced (jump-forward) were never sampled, and the first prompt token has
    no context: both carry None, and OpenAI's schema has no place for that (a number or
    nothing), so they are left out of ``logprobs`` -- consistently, in every format; the text
    still contains them.
    """
    return logprob is not None and math.isfinite(logprob)


def _finite_top(top: list | None) -> list:
    """Top alternatives without the tokens a grammar masked (their logprob is -inf)."""
    return [entry for entry in top or () if _has_logprob(entry[0])]


def finish_reason(meta: dict[str, Any]) -> str | None:
    """OpenAI's finish_reason: stop, length, or abort (a radixlm extension); None mid-stream."""
    finish = meta.get("finish_reason")
    return None if finish is None else finish["type"]


def matched_stop(meta: dict[str, Any]) -> str | int | None:
    """The stop string or token id that ended the output (SGLang's extension field)."""
    finish = meta.get("finish_reason") or {}
    return finish.get("matched")


def usage(results: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Token usage: each prompt counted once, every choice's completion counted.

    ``cached_tokens`` is how many prompt tokens the radix cache supplied (first sample of each
    prompt, the one that paid for the prompt).
    """
    firsts = [r["meta_info"] for r in results[::n]]
    prompt = sum(m["prompt_tokens"] for m in firsts)
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    cached = sum(m.get("cached_tokens", 0) for m in firsts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def _completion_events(
    ctx: ServerContext, plan: Plan, body: CompletionRequest, streams: list, include_usage: bool
) -> AsyncIterator[bytes]:
    tracker = _StreamTracker(len(plan.jobs))
    head = {
        "id": plan.id,
        "object": "text_completion",
        "created": plan.created,
        "model": ctx.served_model_name,
    }
    extra = {"usage": None} if include_usage else {}
    try:
        async for index, chunk in ctx.runner.merge(plan.jobs, streams):
            for choice in _completion_deltas(plan, body, tracker, index, chunk):
                yield sse({**head, "choices": [choice], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(tracker.finals, plan.n)})
    except Exception as exc:
        yield stream_error(exc)
    yield SSE_DONE


def _completion_deltas(
    plan: Plan, body: CompletionRequest, tracker: _StreamTracker, index: int, chunk: dict[str, Any]
) -> list[dict[str, Any]]:
    meta = chunk["meta_info"]
    prompt_text = plan.prompt_texts[index // plan.n]
    echo_now = body.echo and not tracker.started[index]
    text = (prompt_text if echo_now else "") + chunk.get("delta", "")
    logprobs = None
    if body.logprobs is not None:
        if not tracker.started[index]:
            tracker.offsets[index] = len(prompt_text)
        logprobs = completion_logprobs(
            meta,
            echo_now,
            len(prompt_text),
            start=tracker.sent_tokens[index],
            offset=tracker.offsets[index],
        )
        new = list(meta.get("output_token_logprobs", []))[tracker.sent_tokens[index] :]
        tracker.offsets[index] += sum(len(text) for _, _, text in new)
    tracker.advance(index, chunk)
    reason = finish_reason(meta)
    if not text and not (logprobs and logprobs["tokens"]) and reason is None:
        return []
    return [
        {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": reason,
            "matched_stop": matched_stop(meta) if reason else None,
        }
    ]


class _StreamTracker:
    """Per-choice progress of a stream: started, tokens already sent, final results."""

    def __init__(self, count: int):
        self.started = [False] * count
        self.sent_tokens = [0] * count
        self.offsets = [0] * count
        self.final: list[dict[str, Any] | None] = [None] * count

    def advance(self, index: int, chunk: dict[str, Any]) -> None:
        self.started[index] = True
        self.sent_tokens[index] = len(chunk["meta_info"].get("output_token_logprobs", []))
        if chunk["meta_info"].get("finish_reason") is not None:
            self.final[index] = chunk

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [f for f in self.final if f is not None]


# ---- /v1/chat/completions ---------------------------------------------------------------------


@router.post("/v1/chat/completions", openapi_extra=body_doc(ChatCompletionRequest))
async def chat_completions(request: Request, ctx: ServerContext = Depends(get_context)) -> Any:
    """OpenAI chat completions (chat template, n, logprobs, response_format, streaming)."""

    def prepare(body: ChatCompletionRequest) -> tuple[ChatCompletionRequest, Plan]:
        _check_common(body, ctx)
        return body, chat_plan(body, ctx)

    body, plan = await parse_body(request, ChatCompletionRequest, ctx, prepare)
    _check_rid_free(body, ctx)
    outcome = await _run(ctx, plan, request, body)
    if body.stream:
        return _event_stream(_chat_events, ctx, plan, body, outcome)
    return chat_response(plan, outcome, ctx.served_model_name, body.logprobs)


def chat_plan(body: ChatCompletionRequest, ctx: ServerContext) -> Plan:
    """Apply the chat template and build one job per choice (blocking: run it off the loop)."""
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    check_sequences(ctx.bounds, 1, body.n, "n")
    ids = chat_prompt_ids(
        ctx, message_dicts(body.messages), body.add_generation_prompt, body.continue_final_message
    )
    check_prompt_length(ctx.bounds, len(ids), "messages")
    max_tokens = completion_max_tokens(body)
    budget = max_tokens if max_tokens is not None else _default_budget(ctx, len(ids))
    params = sampling_params(body, budget, ctx.engine.vocab_size)
    check_grammar(ctx, params, constraint_param(body))
    logprob = {
        "return_logprob": body.logprobs,
        "top_logprobs_num": body.top_logprobs or 0,
        "logprob_start_len": -1,
    }
    group = body.rid or new_rid("chatcmpl-")
    return Plan(group, _build_jobs(group, [ids], [params], body.n, logprob), [ids], n=body.n)


def chat_response(
    plan: Plan, results: list[dict[str, Any]], model: str, logprobs: bool
) -> dict[str, Any]:
    """The ``chat.completion`` object for finished results (one per choice)."""
    choices = []
    for index, result in enumerate(results):
        meta = result["meta_info"]
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": result["text"]},
                "logprobs": chat_logprobs(meta) if logprobs else None,
                "finish_reason": finish_reason(meta),
                "matched_stop": matched_stop(meta),
            }
        )
    return {
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": model,
        "choices": choices,
        "usage": usage(results, plan.n),
        "system_fingerprint": None,
    }


def chat_logprobs(meta: dict[str, Any], start: int = 0) -> dict[str, Any]:
    """Chat-style logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``.

    Args:
        meta: the engine result's ``meta_info``.
        start: skip this many output tokens (already sent in earlier stream chunks).
    """
    entries = list(meta.get("output_token_logprobs", []))[start:]
    tops = list(meta.get("output_top_logprobs", []))[start:]
    content = []
    for i, (logprob, _token_id, text) in enumerate(entries):
        if not _has_logprob(logprob):
            continue
        top = _finite_top(tops[i] if i < len(tops) else None)
        content.append(
            {
                **_token_entry(logprob, text),
                "top_logprobs": [_token_entry(lp, t) for lp, _, t in top],
            }
        )
    return {"content": content, "refusal": None}


def _token_entry(logprob: float | None, text: str) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


async def _chat_events(
    ctx: ServerContext, plan: Plan, body: ChatCompletionRequest, streams: list, include_usage: bool
) -> AsyncIterator[bytes]:
    tracker = _StreamTracker(len(plan.jobs))
    head = {
        "id": plan.id,
        "object": "chat.completion.chunk",
        "created": plan.created,
        "model": ctx.served_model_name,
        "system_fingerprint": None,
    }
    extra = {"usage": None} if include_usage else {}
    try:
        async for index, chunk in ctx.runner.merge(plan.jobs, streams):
            for choice in _chat_deltas(body, tracker, index, chunk):
                yield sse({**head, "choices": [choice], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(tracker.finals, plan.n)})
    except Exception as exc:
        yield stream_error(exc)
    yield SSE_DONE


def _chat_deltas(
    body: ChatCompletionRequest, tracker: _StreamTracker, index: int, chunk: dict[str, Any]
) -> list[dict[str, Any]]:
    """The chunk choices one engine chunk turns into: role first, content, then finish."""
    meta = chunk["meta_info"]
    out = []
    if not tracker.started[index]:
        out.append(_chat_choice(index, {"role": "assistant", "content": ""}))
    delta = chunk.get("delta", "")
    logprobs = chat_logprobs(meta, tracker.sent_tokens[index]) if body.logprobs else None
    if delta or (logprobs and logprobs["content"]):
        out.append(_chat_choice(index, {"content": delta}, logprobs))
    tracker.advance(index, chunk)
    reason = finish_reason(meta)
    if reason is not None:
        out.append(_chat_choice(index, {}, None, reason, matched_stop(meta)))
    return out


def _chat_choice(
    index: int,
    delta: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
    reason: str | None = None,
    matched: str | int | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": reason,
        "matched_stop": matched,
    }
