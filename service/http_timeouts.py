"""uvicorn's HTTP protocols with a header deadline: a connection must send a request's headers
within ``header_timeout_s`` of opening, or of its previous response, or it is closed.

uvicorn has a keep-alive timeout but none for a connection that opens and sends nothing, or that
trickles its headers a byte at a time (slowloris): each holds a socket and a protocol object
forever. The deadline is armed when the connection opens and when a response completes with
nothing queued behind it, and disarmed once the next request's headers are complete; the body
has its own deadline (``CPCNN_BODY_TIMEOUT_S``, in ``service.upload``). ``python -m service``
runs uvicorn with ``timed_protocol(settings.header_timeout_s)``.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                    b"content-length: 31\r\nconnection: close\r\n\r\nrequest headers took too long\r\n")


class _HeaderDeadline:
    """Mixed into a uvicorn protocol class; ``header_timeout_s`` is set by ``timed_protocol``."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            logger.info("closing a connection from %s that sent no complete request headers in "
                        "%g s (CPCNN_HEADER_TIMEOUT_S)", self.client, self.header_timeout_s)
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.timeout_keep_alive_task is not None:  # idle: waiting for the next request
            self._arm_header_deadline()


class TimedH11Protocol(_HeaderDeadline, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in (h11.SEND_BODY, h11.DONE):  # this request's headers are in
            self._disarm_header_deadline()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional in uvicorn; h11 always there
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:
    class TimedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            self._disarm_header_deadline()
            super().on_headers_complete()


def timed_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's ``http=`` argument: its fastest protocol with a header deadline of this many s."""
    base = TimedHttpToolsProtocol if HttpToolsProtocol is not None else TimedH11Protocol
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s})
