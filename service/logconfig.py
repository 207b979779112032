"""Logging set-up, done once at the entry point (``python -m service``) or the app's start-up."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Give the root logger a handler unless one is configured already (uvicorn, pytest)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format=FORMAT)
    logging.getLogger("service").setLevel(level)
