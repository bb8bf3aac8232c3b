"""The live dashboard: ``/dashboard`` (one page), ``/dashboard/state`` (JSON) and
``/dashboard/events`` (server-sent events, about two a second).

The engine core hands over plain, bounded snapshots (``Engine.dashboard_state``): the radix
tree's largest nodes, and its latest batches, admissions and compilations. This module never
touches the tree. One sampler task per server takes a snapshot every ``PERIOD_S`` while anyone
watches (it stops after ``IDLE_STOP_S`` without a viewer), keeps the time series the charts draw,
and decodes token ids into text in a worker thread, so the event loop only copies dicts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from radixlm.server.common import SafeJSONResponse, dumps
from radixlm.server.errors import APIError

logger = logging.getLogger("radixlm.server.dashboard")

PERIOD_S = 0.5
IDLE_STOP_S = 60.0
HISTORY_POINTS = 600  # five minutes at two samples a second
LABEL_CHARS = 48
SNAPSHOT_TIMEOUT_S = 10.0

router = APIRouter()


class DashboardFeed:
    """Samples the engine for the dashboard and keeps the series it charts.

    Args:
        engine: a radixlm ``Engine`` (``dashboard_state()`` and ``tokenizer`` are used).
        period_s: seconds between samples while someone watches.
    """

    def __init__(self, engine: Any, period_s: float = PERIOD_S):
        self.engine = engine
        self.period_s = period_s
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self.latest: dict[str, Any] | None = None
        self.version = 0
        self._last_viewed = 0.0
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._previous_raw: dict[str, Any] | None = None

    async def state(self) -> dict[str, Any]:
        """The newest state, sampling now when none is fresh (starts the sampler)."""
        self._viewed()
        if self.latest is None or time.time() - self.latest["time"] > 2 * self.period_s:
            await self._sample()
        return self.latest

    async def updates(self, request: Request):
        """Yield each new state as an SSE event until the client goes away."""
        seen = -1
        while not await request.is_disconnected():
            self._viewed()
            if self.version != seen and self.latest is not None:
                seen = self.version
                yield f"data: {dumps(self.latest)}\n\n".encode()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=2 * self.period_s)
            except asyncio.TimeoutError:
                yield b": keep-alive\n\n"

    def _viewed(self) -> None:
        self._last_viewed = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while time.monotonic() - self._last_viewed < IDLE_STOP_S:
            try:
                await self._sample()
            except APIError:
                logger.warning("dashboard: the engine did not answer a snapshot")
            await asyncio.sleep(self.period_s)

    async def _sample(self) -> None:
        try:
            raw = await asyncio.wait_for(asyncio.to_thread(self.engine.dashboard_state),
                                         SNAPSHOT_TIMEOUT_S)
        except Exception as exc:
            raise APIError(503, f"the engine is not responding: {exc or type(exc).__name__}",
                           code="engine_unavailable") from exc
        raw["info"]["model_name"] = getattr(self.engine, "model_name", "")
        self.history.append(_point(raw, self._previous_raw))
        self._previous_raw = raw
        state = await asyncio.to_thread(_assemble, raw, list(self.history),
                                        self.engine.tokenizer)
        self.latest = state
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()


def _point(raw: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """One sample of the time series: KV pool split, hit rate, throughput, queue."""
    info = raw["info"]
    capacity = info["kv_capacity_tokens"]
    free = info["kv_free_tokens"]
    cached = min(info["evictable_tokens"], capacity - free)
    point = {
        "time": raw["time"],
        "kv_free": free,
        "kv_cached": cached,
        "kv_in_use": capacity - free - cached,
        "running": info["running_requests"],
        "waiting": info["waiting_requests"],
        "hit_rate_total": info["cache_hit_rate"],
        "hit_rate": None,
        "input_tps": None,
        "output_tps": None,
        "retractions": info["num_retractions"],
    }
    if previous is not None:
        before = previous["info"]
        dt = raw["time"] - previous["time"]
        prompt = info["num_prompt_tokens"] - before["num_prompt_tokens"]
        if prompt > 0:
            point["hit_rate"] = (info["num_cached_tokens"] - before["num_cached_tokens"]) / prompt
        if dt > 0:
            point["input_tps"] = max(0, prompt) / dt
            out = info["num_generated_tokens"] - before["num_generated_tokens"]
            point["output_tps"] = max(0, out) / dt
    return point


def _assemble(raw: dict[str, Any], history: list[dict[str, Any]], tokenizer: Any
              ) -> dict[str, Any]:
    """The JSON the page draws: snapshot figures, labelled nodes and requests, the series."""
    tree = dict(raw["tree"])
    tree["nodes"] = [dict(n, text=_label(tokenizer, n["head_ids"]), tokens_shown=len(n["head_ids"]))
                     for n in tree["nodes"]]
    for node in tree["nodes"]:
        node.pop("head_ids")
    activity = raw["activity"]
    requests = [_request_view(tokenizer, a) for a in reversed(activity["admissions"])]
    compiles = list(reversed(activity["compiles"]))
    return {
        "time": raw["time"],
        "info": raw["info"],
        "tree": tree,
        "batches": activity["batches"],
        "requests": requests,
        "compile": {"pending": activity["compiles_pending"], "recent": compiles},
        "history": history,
    }


def _request_view(tokenizer: Any, record: dict[str, Any]) -> dict[str, Any]:
    cached = record["cached_tokens"]
    head = record["head_ids"]
    return {
        "rid": record["rid"],
        "time": record["time"],
        "prompt_tokens": record["prompt_tokens"],
        "cached_tokens": cached,
        "computed_tokens": record["prompt_tokens"] - cached,
        "node_id": record["node_id"],
        # The start of the prompt, split where the cached prefix ends (when that is within the
        # kept head), and the first computed tokens.
        "cached_text": _text(tokenizer, head[:cached]),
        "cached_elided": cached > len(head),
        "computed_text": _text(tokenizer, record["tail_ids"]),
    }


def _label(tokenizer: Any, ids: list[int]) -> str:
    text = _text(tokenizer, ids)
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _text(tokenizer: Any, ids: list[int]) -> str:
    if not ids:
        return ""
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except Exception:  # ids from another tokenizer's vocabulary never crash the page
        return " ".join(str(i) for i in ids)


def feed_of(request: Request) -> DashboardFeed:
    """The app's DashboardFeed, made on first use (it needs a running event loop)."""
    state = request.app.state
    feed = getattr(state, "dashboard_feed", None)
    if feed is None:
        feed = state.dashboard_feed = DashboardFeed(state.ctx.engine)
    return feed


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> HTMLResponse:
    """The dashboard page (static; it reads /dashboard/events)."""
    page = resources.files("radixlm.server").joinpath("static/dashboard.html").read_text("utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})


@router.get("/dashboard/state")
async def dashboard_state(request: Request) -> SafeJSONResponse:
    """The dashboard's data: engine figures, the radix tree's largest nodes, recent batches,
    admissions (prompt split into cached and computed tokens) and compilations, and the time
    series (KV pool, hit rate, tokens/s, queue)."""
    return SafeJSONResponse(await feed_of(request).state())


@router.get("/dashboard/events")
async def dashboard_events(request: Request) -> StreamingResponse:
    """The same state as server-sent events, one per sample (about two a second)."""
    feed = feed_of(request)
    await feed.state()
    return StreamingResponse(feed.updates(request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
