"""Caller-side request state: detokenizes core outputs and assembles result dicts.

Runs in the caller's process (the engine core never touches text except for stop strings).
Results follow SGLang's native shape: ``{"text", "output_ids", "meta_info": {...}}``.
"""

from __future__ import annotations

import asyncio
import queue
import time
from typing import Any

from radixlm.outputs import TokenLogprob, TokenOutput
from radixlm.request import FinishKind, LogprobOptions
from radixlm.sampling_params import SamplingParams
from radixlm.tokenizer.detokenizer import IncrementalDetokenizer

_DONE = object()


class RequestState:
    """One request as the caller sees it, fed by the engine's receiver thread.

    Args:
        rid: request id.
        prompt_ids: the prompt's token ids.
        params: sampling parameters (stop strings, skip_special_tokens).
        logprob: which logprobs were asked for.
        tokenizer: the model's tokenizer.
        stream: push a chunk per core output instead of only the final result.
        loop: the asyncio loop to deliver to (async callers), or None (a thread queue).
    """

    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                 logprob: LogprobOptions, tokenizer, stream: bool,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.rid = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.logprob = logprob
        self.tokenizer = tokenizer
        self.stream = stream
        self.detok = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
            prompt_token_ids=prompt_ids)
        self.output_ids: list[int] = []
        self.meta: dict[str, Any] = {"id": rid, "prompt_tokens": len(prompt_ids),
                                     "completion_tokens": 0, "cached_tokens": 0,
                                     "finish_reason": None}
        self.logprobs: dict[str, list] = {"output_token_logprobs": [], "output_top_logprobs": []}
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.finished = False
        self._deliveries: DeliveryBatch | None = None
        self.loop = loop
        self.events: queue.SimpleQueue | asyncio.Queue = (
            asyncio.Queue() if loop is not None else queue.SimpleQueue())

    # ---- fed by the receiver thread -------------------------------------------------------

    def apply(self, out: TokenOutput, deliveries: DeliveryBatch | None = None) -> None:
        """Fold one core output into the state and deliver a chunk if due.

        Args:
            out: the core's output for this request.
            deliveries: when given, chunks for an asyncio caller are gathered there and reach
                its loop with the rest of the step's (:meth:`DeliveryBatch.flush`).
        """
        self._deliveries = deliveries
        if out.new_token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.output_ids.extend(out.new_token_ids)
        delta = self.detok.append(out.new_token_ids) if out.new_token_ids else ""
        self._update_meta(out)
        if out.finish is not None:
            delta += self.detok.flush()
            self.finished = True
            self.meta["finish_reason"] = out.finish.to_dict()
            self.meta["e2e_latency"] = time.monotonic() - self.created
        if self.stream or self.finished:
            chunk = self.result()
            chunk["delta"] = delta
            self._push(chunk)
        if self.finished:
            self._push(_DONE)
        self._deliveries = None

    def fail(self, exc: BaseException) -> None:
        """Deliver an error to whoever waits on this request."""
        self.finished = True
        self._push(exc)
        self._push(_DONE)

    def _push(self, item: Any) -> None:
        if self.loop is None:
            self.events.put(item)
        elif self._deliveries is not None:
            self._deliveries.add(self.loop, self.events, item)
        else:
            _call_in_loop(self.loop, self.events.put_nowait, item)

    def _update_meta(self, out: TokenOutput) -> None:
        meta = self.meta
        meta["completion_tokens"] = len(self.output_ids)
        meta["cached_tokens"] = out.cached_tokens
        meta["jump_forward_tokens"] = out.jump_forward_tokens
        if self.first_token_at is not None:
            meta["ttft"] = self.first_token_at - self.created
        if self.logprob.return_logprob:
            self._update_logprobs(out)

    def _update_logprobs(self, out: TokenOutput) -> None:
        lp = self.logprobs
        lp["output_token_logprobs"].extend(self._with_text(out.output_logprobs))
        if self.logprob.top_logprobs_num:
            lp["output_top_logprobs"].extend(
                self._with_text(t) if t else None for t in out.output_top_logprobs)
        if out.input_logprobs is not None:
            lp["input_token_logprobs"] = self._with_text(out.input_logprobs)
            if self.logprob.top_logprobs_num and out.input_top_logprobs is not None:
                lp["input_top_logprobs"] = [
                    self._with_text(t) if t else None for t in out.input_top_logprobs]

    def _with_text(self, pairs: list[TokenLogprob]) -> list[tuple[float | None, int, str | None]]:
        if not self.logprob.return_text:
            return [(lp, tid, None) for lp, tid in pairs]
        return [(lp, tid, self.tokenizer.decode([tid])) for lp, tid in pairs]

    # ---- read by the caller ---------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        """The result so far (final once ``finished``)."""
        meta = dict(self.meta)
        if self.logprob.return_logprob:
            meta.update({k: list(v) for k, v in self.logprobs.items()})
        return {"text": self.detok.text, "output_ids": list(self.output_ids), "meta_info": meta}

    @property
    def rejected(self) -> bool:
        """Finished by an abort before producing anything because the request was invalid."""
        finish = self.meta["finish_reason"]
        return bool(finish and finish["type"] == FinishKind.ABORT.value
                    and str(finish.get("message", "")).startswith("invalid constraint"))


def is_done(item: Any) -> bool:
    return item is _DONE


class DeliveryBatch:
    """Chunks for asyncio callers gathered while one core message (one step's outputs) is
    applied, then handed to each event loop in a single thread-safe call.

    At 512 streaming requests a step used to cost the loop 512+ wake-ups from the receiving
    thread (one ``call_soon_threadsafe`` per chunk); now it costs one per loop per step.
    """

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, item: Any) -> None:
        self._items.setdefault(loop, []).append((events, item))

    def flush(self) -> None:
        """Deliver everything gathered, one call per loop, in the order it was added."""
        items, self._items = self._items, {}
        for loop, pairs in items.items():
            _call_in_loop(loop, _put_all, pairs)


def _put_all(pairs: list[tuple[asyncio.Queue, Any]]) -> None:
    for events, item in pairs:
        events.put_nowait(item)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Any, arg: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:  # the caller's loop is closed: nobody is left to read the chunk
        pass


def merge_chunks(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """One chunk standing for two consecutive ones of a stream.

    Chunks are cumulative snapshots (text, ids, meta, logprobs so far) plus the text ``delta``
    since the previous chunk, so the newer snapshot with both deltas loses nothing.
    """
    merged = dict(newer)
    merged["delta"] = older.get("delta", "") + newer.get("delta", "")
    return merged


def take_coalesced(item: Any, events: queue.SimpleQueue | asyncio.Queue) -> tuple[Any, Any]:
    """``item`` merged with every chunk already queued behind it.

    A consumer that fell behind (a slow client, a busy event loop) then sends one event for
    the tokens of several steps instead of one per step, and catches up.

    Returns:
        (the merged chunk, the first queued item that is not a chunk, or None).
    """
    if not isinstance(item, dict):
        return item, None
    while not events.empty():
        nxt = events.get_nowait()
        if not isinstance(nxt, dict):
            return item, nxt
        item = merge_chunks(item, nxt)
    return item, None
