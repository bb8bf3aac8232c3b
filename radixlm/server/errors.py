"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` on every route.

User mistakes are 4xx with a message that says what to fix; a 500 only ever means a bug in
radixlm, and it is logged with its traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixlm.engine.errors import EngineDeadError, QueueFullError, RequestError

logger = logging.getLogger("radixlm.server")

# Retry-After of a 429 raised by the engine's own queue check (the server's check says its own).
QUEUE_RETRY_AFTER_S = 1

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


# FastAPI's detail when the body fails to parse other than as a JSON syntax error
# (json.loads raised RecursionError, ValueError for a 5000-digit integer, UnicodeDecodeError).
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


class APIError(Exception):
    """An error the server answers with directly (raised inside route handlers).

    Args:
        status: HTTP status code.
        message: what went wrong and, where possible, how to fix it.
        param: the request field at fault, if one is.
        code: a short machine-readable code (``model_not_found``, ``queue_full``...).
        headers: extra response headers (``Retry-After`` on a 429).
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    kind = _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """A JSONResponse carrying :func:`error_body`."""
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


def error_event(status: int, message: str, param: str | None = None) -> bytes:
    """An error as one server-sent event, for failures after a stream has started."""
    return f"data: {json.dumps(error_body(status, message, param))}\n\n".encode()


def from_exception(exc: BaseException) -> APIError:
    """Map an engine-side exception onto the HTTP error it deserves.

    Raises:
        BaseException: ``exc`` itself when it is not a known user-facing error (a bug).
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, exc.message, exc.param)
    if isinstance(exc, QueueFullError):
        message = str(exc) or "the request queue is full"
        if "retry later" not in message:  # the engine's own message may already say so
            message += "; retry later"
        return APIError(429, message, code="queue_full",
                        headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        message = str(exc) or "the engine has stopped"
        return APIError(503, message, code="engine_dead")
    raise exc


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic's error list into one readable message and the first offending field."""
    parts, first_param = [], None
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "invalid JSON")
            return f"malformed JSON body: {detail}", None
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_branch(p)]
        param = ".".join(loc) or None
        first_param = first_param or param
        parts.append(f"{param}: {err.get('msg')}" if param else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", first_param


def _is_branch(part: Any) -> bool:
    """A location part that names a union member's type (``list[int]``, ``str``), not a field."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_NAMES)


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "function-after",
                         "json-or-python", "ContentPart", "ChatMessage", "JsonSchemaFormat"})


def install_error_handlers(app: FastAPI) -> None:
    """Make every error path of ``app`` answer with an OpenAI-shaped body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        allow = (exc.headers or {}).get("Allow")
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see docs/server.md for the API"
        elif exc.status_code == 405 and allow:
            message = f"{request.method} is not allowed on {request.url.path}; use {allow}"
        elif message == _FASTAPI_BODY_ERROR:
            message = ("malformed JSON body: not UTF-8, nested too deep, or an integer with "
                       "too many digits")
        response = error_response(exc.status_code, message)
        if allow:  # a 405 must say which methods the route takes
            response.headers["Allow"] = allow
        return response

    @app.exception_handler(RequestError)
    @app.exception_handler(QueueFullError)
    @app.exception_handler(EngineDeadError)
    async def _engine(_: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error while serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__}); see the "
                                   "server log", code="internal_error")
