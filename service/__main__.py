"""``python -m service [--host H] [--port N] [--model-dir DIR] [--log-level L]``: serve
``service.app:app`` with uvicorn, with the header deadline (``service.http_timeouts``) and the
keep-alive timeout of the settings. Each flag sets the matching ``CPCNN_*`` variable for this
process (the flag wins over the environment); everything else is read from the environment."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from service.app import app as application
from service.errors import StartupError
from service.http_timeouts import timed_protocol
from service.logconfig import configure_logging
from service.settings import resolve_settings

logger = logging.getLogger("service")


def _exit_zero(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


FLAGS = {"host": "CPCNN_HOST", "port": "CPCNN_PORT", "model_dir": "CPCNN_MODEL_DIR",
         "log_level": "CPCNN_LOG_LEVEL"}


def parse_flags(argv: list[str] | None) -> dict[str, str]:
    """The ``CPCNN_*`` variables the command line sets."""
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", help="interface to bind (CPCNN_HOST)")
    parser.add_argument("--port", type=int, help="port to bind (CPCNN_PORT)")
    parser.add_argument("--model-dir", help="package to serve (CPCNN_MODEL_DIR)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ... (CPCNN_LOG_LEVEL)")
    args = parser.parse_args(argv)
    return {env: str(v) for name, env in FLAGS.items() if (v := getattr(args, name)) is not None}


def main(argv: list[str] | None = None) -> int:
    # Settings are read from the environment when the app resolves them: the flags go there first.
    os.environ.update(parse_flags(argv))
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
                log_level=settings.log_level.lower(), http=timed_protocol(settings.header_timeout_s),
                timeout_keep_alive=settings.keep_alive_s,
                timeout_graceful_shutdown=settings.shutdown_grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
