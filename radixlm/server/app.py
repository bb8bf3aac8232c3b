"""The FastAPI application (native + OpenAI routes) and the draining uvicorn runner."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from radixlm.server.common import SafeJSONResponse, ServerContext, ServerLimits, dumps
from radixlm.server.dashboard import router as dashboard_router
from radixlm.server.errors import error_body, install_error_handlers
from radixlm.server.metrics import ServerMetrics
from radixlm.server.native_api import router as native_router
from radixlm.server.openai_api import router as openai_router
from radixlm.server.transport import guarded_h11_protocol

logger = logging.getLogger("radixlm.server")

# Routes that answer without an API key (load-balancer probes and scrapers).
OPEN_PATHS = frozenset({"/health", "/metrics"})
DEFAULT_DRAIN_TIMEOUT_S = 30.0
ENGINE_WATCH_PERIOD_S = 0.25
# After the core died, how long in-flight requests get to receive their 503 before the exit.
DEAD_ENGINE_ANSWER_S = 10.0


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
        length = _content_length(scope)
        limit = self.ctx.limits.max_request_bytes
        if length is not None and length > limit:
            return 413, (f"the request body ({length} bytes) is larger than the server's limit "
                         f"of {limit} bytes (--max-request-bytes)")
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
        if status in (413, 503):  # a 413's body is never read: the connection cannot be reused
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
               api_key: str | None = None, limits: ServerLimits | None = None,
               allowed_origins: list[str] | None = None, enable_docs: bool = True) -> FastAPI:
    """Build the HTTP application around a running engine.

    The app does not own the engine: whoever created it shuts it down.

    Args:
        engine: a radixlm ``Engine``.
        served_model_name: the model name clients use; defaults to ``engine.model_name``.
        api_key: require ``Authorization: Bearer <api_key>`` (except on /health and /metrics).
        limits: request size, queue and time limits (defaults: :class:`ServerLimits`).
        allowed_origins: browser origins allowed by CORS (``["*"]`` for any); None: no CORS.
        enable_docs: serve /docs, /redoc and /openapi.json.

    Returns:
        The FastAPI app; its ``state.ctx`` is the :class:`ServerContext`.
    """
    name = served_model_name or engine.model_name
    ctx = ServerContext(engine, name, api_key, ServerMetrics(name), limits or ServerLimits())
    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="radixlm", version=_version(), default_response_class=SafeJSONResponse,
                  **docs)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(native_router)
    app.include_router(openai_router)
    app.include_router(dashboard_router)
    app.add_middleware(GatewayMiddleware, ctx=ctx)
    if allowed_origins:
        # outermost, so that a browser's preflight (no API key) is answered before the gateway
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


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
        self.engine_death: str | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.ctx.draining = True  # from this instant new requests get 503
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._watcher = asyncio.create_task(self._watch_engine())
        if self.started and self.on_started is not None:
            self.on_started()

    async def _watch_engine(self) -> None:
        """When the engine core dies: refuse new requests, let the in-flight ones get their
        answer (503 engine_dead), then stop serving so the process exits non-zero and a
        supervisor notices. A server that answers 503 forever helps nobody."""
        while not self.should_exit:
            await asyncio.sleep(ENGINE_WATCH_PERIOD_S)
            reason = self.ctx.engine.dead_reason
            if reason is None:
                continue
            logger.error("the engine core died (%s); answering in-flight requests, then exiting",
                         reason)
            self.engine_death = reason
            self.ctx.draining = True
            await self.ctx.wait_idle(DEAD_ENGINE_ANSWER_S)
            self.should_exit = True
            return

    async def shutdown(self, sockets: Any = None) -> None:
        logger.info("draining: waiting up to %.0fs for %d request(s)", self.drain_timeout,
                    self.ctx.active_requests)
        await self.ctx.drain(self.drain_timeout)
        await super().shutdown(sockets)
        self.ctx.close()


def run_server(app: FastAPI, host: str, port: int, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
               log_level: str = "info", on_started: Callable[[], None] | None = None,
               ssl_keyfile: str | None = None, ssl_certfile: str | None = None) -> str | None:
    """Serve ``app`` until SIGTERM/SIGINT or the engine core dies, then drain and return (the
    caller stops the engine).

    Args:
        app: from :func:`create_app`.
        host: interface to bind.
        port: TCP port to bind.
        drain_timeout: seconds in-flight requests get to finish on shutdown.
        log_level: uvicorn log level.
        on_started: called once listening.
        ssl_keyfile: PEM private key; with ``ssl_certfile`` the server speaks HTTPS only.
        ssl_certfile: PEM certificate (chain).

    Returns:
        None after a signal; why the engine core died, when that stopped the server.
    """
    ctx = app.state.ctx
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=10, lifespan="off",
                            http=guarded_h11_protocol(ctx.limits.header_timeout),
                            ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)
    server = DrainingServer(config, ctx, drain_timeout, on_started)
    # uvicorn re-raises the signal that stopped it once serving ends; a no-op handler keeps that
    # from killing the process before the caller shuts the engine down and exits cleanly.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server.engine_death


def _ignore(signum: int, frame: Any) -> None:
    logger.info("signal %d received during shutdown", signum)
