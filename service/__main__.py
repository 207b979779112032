"""``python -m service``: serve ``service.app:app`` with uvicorn on CPCNN_HOST:CPCNN_PORT."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import uvicorn

from service.app import app as application
from service.app import resolve_settings
from service.errors import StartupError
from service.logconfig import configure_logging

logger = logging.getLogger("service")


def _exit_zero(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found:
    # with this one the process then exits 0 (a requested stop is not a failure) instead of dying
    # by the signal. SIGTERM before uvicorn has started exits 0 at once.
    signal.signal(signal.SIGTERM, _exit_zero)
    try:
        settings = resolve_settings(application)
    except StartupError as e:
        configure_logging()
        logger.error("cannot start: %s", e)
        return 2
    configure_logging(settings.log_level)
    uvicorn.run("service.app:app", host=settings.host, port=settings.port,
                log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
