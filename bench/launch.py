"""Running the service as a child process on loopback, for the tests, ``make bench`` and
``make soak``: a free port, a clean environment, and waiting until it answers ready.

Each caller reports a failure its own way (``pytest.fail`` with the server's log, an exception,
an exit), so ``wait_until_ready`` says what went wrong instead of raising. Stdlib only: the
serving install has no HTTP client.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ``CPCNN_*`` variable, plus ``settings``: a child
    server sees exactly the settings its caller chose, never a developer's exported ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPCNN_")}
    env.update(settings)
    return env


def wait_until_ready(url: str, *, alive: Callable[[], bool], timeout: float,
                     interval: float = 0.2) -> str | None:
    """Poll ``url`` until it answers 200. None once it does; otherwise why not: the process
    exited (``alive()`` turned false) or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            return "exited before it was ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return None
        except (urllib.error.URLError, OSError):  # not listening yet, or 503 while warming up
            pass
        if time.monotonic() > deadline:
            return f"not ready after {timeout:.0f} s"
        time.sleep(interval)
