"""Errors the engine raises to its callers (the server maps them to HTTP statuses)."""

from __future__ import annotations


class RequestError(ValueError):
    """The request is invalid (HTTP 400). ``param`` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class QueueFullError(RuntimeError):
    """Too many requests are waiting (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine core process has exited; no request can be served."""
