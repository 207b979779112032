"""Readiness first on SIGTERM: the app turns ``/readyz`` 503 before the server stops accepting.

uvicorn's own graceful shutdown on SIGTERM closes the listening socket, waits for the requests in
flight, then runs the lifespan's shutdown, so on its own readiness would only turn 503 at the very
end. While the app runs, ``readiness_first`` wraps the server's SIGTERM/SIGINT handlers: on the
signal it marks the service not ready at once, keeps serving for ``delay`` seconds (SIGTERM only:
the time a load balancer needs to see the 503 and stop routing here), then hands the signal to the
server, whose graceful shutdown proceeds as before. Nothing is wrapped where there is no server
handler to hand over to (tests driving the ASGI app directly) or off the main thread.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def readiness_first(on_signal: Callable[[], None], *, delay: float = 0.0) -> Iterator[None]:
    """While inside: SIGTERM/SIGINT call ``on_signal`` (in the event loop), then the server's handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    servers = {sig: h for sig in SIGNALS if callable(h := signal.getsignal(sig))}
    if not servers:
        yield
        return

    def handle(sig: int, frame: FrameType | None) -> None:
        # A signal handler: only hand work to the loop (no locks, no logging here).
        loop.call_soon_threadsafe(on_signal)
        wait = delay if sig == signal.SIGTERM else 0.0
        if wait > 0:
            loop.call_soon_threadsafe(loop.call_later, wait, servers[sig], sig, None)
        else:
            servers[sig](sig, frame)

    for sig in servers:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, server_handler in servers.items():
            if signal.getsignal(sig) is handle:
                signal.signal(sig, server_handler)
