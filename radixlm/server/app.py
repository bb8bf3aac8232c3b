"""The FastAPI application (native + OpenAI routes) and the draining uvicorn runner."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from radixlm.server.dashboard import router as dashboard_router
from radixlm.server.errors import error_body, install_error_handlers
from radixlm.server.metrics import ServerMetrics
from radixlm.server.runner import Inflight, Runner

logger = logging.getLogger("radixlm.server")

# Routes that answer without an API key (load-balancer probes and scrapers).
OPEN_PATHS = frozenset({"/health", "/metrics"})
DEFAULT_DRAIN_TIMEOUT_S = 30.0


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


@dataclass
class ServerContext:
    """Everything the route handlers share; one per app (no module-level state).

    Attributes:
        engine: the radixlm Engine being served.
        served_model_name: the name clients pass as ``model``.
        api_key: when set, every route but OPEN_PATHS needs ``Authorization: Bearer <key>``.
        metrics: Prometheus metrics of this server.
        inflight: engine requests currently running.
        runner: submits requests to the engine.
        draining: set on SIGTERM; new requests are answered 503.
        active_requests: HTTP requests being handled right now.
    """

    engine: Any
    served_model_name: str
    api_key: str | None
    metrics: ServerMetrics
    inflight: Inflight = field(default_factory=Inflight)
    runner: Runner | None = None
    draining: bool = False
    active_requests: int = 0
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.runner = Runner(self.engine, self.metrics, self.inflight)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let running ones finish for ``timeout`` s, then abort the rest."""
        self.draining = True
        if await self._wait_idle(timeout):
            return
        logger.warning("drain timeout: aborting %d running request(s)", len(self.inflight))
        self.runner.abort(self.inflight.rids())
        await self._wait_idle(5.0)

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.active_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active_requests == 0


def get_context(request: Request) -> ServerContext:
    """The ServerContext of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.ctx


class GatewayMiddleware:
    """Pure ASGI middleware: API key, drain refusal, active-request count, error metrics.

    Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and client-disconnect
    messages pass through untouched.
    """

    def __init__(self, app: Callable, ctx: ServerContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await self._reply(send, *refusal)
            return
        self.ctx.active_requests += 1
        try:
            await self.app(scope, receive, self._counting(send))
        finally:
            self.ctx.active_requests -= 1

    def _refusal(self, scope: dict) -> tuple[int, str] | None:
        path = scope.get("path", "")
        if self.ctx.draining and path != "/metrics":
            return 503, "the server is shutting down; retry on another replica"
        if self.ctx.api_key and path not in OPEN_PATHS and not self._authorized(scope):
            return 401, "missing or invalid API key (send 'Authorization: Bearer <key>')"
        return None

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not token and scope.get("path", "").startswith("/dashboard"):
            # A browser cannot add a header to a page load or an EventSource: the dashboard
            # takes the key from ?api_key= as well.
            token = _query_key(scope.get("query_string", b""))
        return hmac.compare_digest(token.encode(), self.ctx.api_key.encode())

    async def _reply(self, send: Callable, status: int, message: str) -> None:
        self.ctx.metrics.observe_error(status)
        body = dumps(error_body(status, message)).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if status == 503:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _counting(self, send: Callable) -> Callable:
        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.ctx.metrics.observe_error(message["status"])
            await send(message)

        return wrapped


def create_app(engine: Any, served_model_name: str | None = None,
               api_key: str | None = None) -> FastAPI:
    """Build the HTTP application around a running engine.

    The app does not own the engine: whoever created it shuts it down.

    Args:
        engine: a radixlm ``Engine``.
        served_model_name: the model name clients use; defaults to ``engine.model_name``.
        api_key: require ``Authorization: Bearer <api_key>`` (except on /health and /metrics).

    Returns:
        The FastAPI app; its ``state.ctx`` is the :class:`ServerContext`.
    """
    from radixlm.server.native_api import router as native_router
    from radixlm.server.openai_api import router as openai_router

    name = served_model_name or engine.model_name
    ctx = ServerContext(engine, name, api_key, ServerMetrics(name))
    app = FastAPI(title="radixlm", version=_version(), default_response_class=SafeJSONResponse)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(native_router)
    app.include_router(openai_router)
    app.include_router(dashboard_router)
    app.add_middleware(GatewayMiddleware, ctx=ctx)
    return app


def _query_key(query: bytes) -> str:
    values = parse_qs(query.decode("latin-1")).get("api_key", [])
    return values[0] if values else ""


def _version() -> str:
    from radixlm import __version__

    return __version__


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT first drains the app, then stops as usual.

    Args:
        config: the uvicorn config (its app is a radixlm app).
        ctx: the app's ServerContext.
        drain_timeout: seconds in-flight requests get to finish before they are aborted.
        on_started: called once the socket is bound (prints the start-up banner).
    """

    def __init__(self, config: uvicorn.Config, ctx: ServerContext, drain_timeout: float,
                 on_started: Callable[[], None] | None = None):
        super().__init__(config)
        self.ctx = ctx
        self.drain_timeout = drain_timeout
        self.on_started = on_started

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.ctx.draining = True  # from this instant new requests get 503
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: Any = None) -> None:
        logger.info("draining: waiting up to %.0fs for %d request(s)", self.drain_timeout,
                    self.ctx.active_requests)
        await self.ctx.drain(self.drain_timeout)
        await super().shutdown(sockets)


def run_server(app: FastAPI, host: str, port: int, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
               log_level: str = "info", on_started: Callable[[], None] | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain and return (the caller stops the engine).

    Args:
        app: from :func:`create_app`.
        host: interface to bind.
        port: TCP port to bind.
        drain_timeout: seconds in-flight requests get to finish on shutdown.
        log_level: uvicorn log level.
        on_started: called once listening.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=10, lifespan="off")
    server = DrainingServer(config, app.state.ctx, drain_timeout, on_started)
    # uvicorn re-raises the signal that stopped it once serving ends; a no-op handler keeps that
    # from killing the process before the caller shuts the engine down and exits cleanly.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore(signum: int, frame: Any) -> None:
    logger.info("signal %d received during shutdown", signum)
