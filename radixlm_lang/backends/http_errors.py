"""Turning HTTP error responses (OpenAI-shaped ``{"error": {...}}`` bodies) into BackendErrors."""

from __future__ import annotations

from typing import Any

import httpx

from radixlm_lang.backends.base import BackendError


def http_error(response: httpx.Response) -> BackendError:
    """The error a failed response carries, with the server's message and parameter."""
    try:
        body = response.json()
    except ValueError:
        message = f"HTTP {response.status_code}: {response.text[:500]}"
        return BackendError(message, response.status_code)
    return error_from_body(body, response.status_code)


def error_from_body(body: Any, status: int | None) -> BackendError:
    """The error of a JSON body (a response or a streamed ``data:`` event)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = error.get("message", str(error))
        return BackendError(f"server error ({status}): {message}", status, error.get("param"))
    return BackendError(f"server error ({status}): {body}", status)
