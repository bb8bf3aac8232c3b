"""The HTTP/1.1 connection handler: uvicorn's h11 protocol with a deadline for request headers.

uvicorn times out idle keep-alive connections, but not one that sent half a request line: a
client trickling headers holds a connection (and its memory) for as long as it likes. Here every
request's headers must be complete within ``header_timeout`` seconds of their first byte (of the
connection's opening, for the first request), or the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("radixlm.server")


class HeaderDeadlineH11Protocol(H11Protocol):
    """``H11Protocol`` that closes connections whose request headers arrive too slowly."""

    header_timeout: float = 5.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are complete: the request is the app's business now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info(
                "closing a connection from %s: no complete request headers within %gs",
                self.client,
                self.header_timeout,
            )
            self.transport.close()


def guarded_h11_protocol(header_timeout: float) -> type[HeaderDeadlineH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this header deadline.

    Args:
        header_timeout: seconds a request's headers may take to arrive.

    Returns:
        A subclass of :class:`HeaderDeadlineH11Protocol` bound to ``header_timeout``.
    """
    return type(
        "HeaderDeadlineH11Protocol",
        (HeaderDeadlineH11Protocol,),
        {"header_timeout": header_timeout},
    )
