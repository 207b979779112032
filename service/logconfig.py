"""Logging set-up, done once at the entry point (``python -m service``) or the app's start-up."""

from __future__ import annotations

import logging
import re

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A query parameter whose name says it holds a secret: its value never reaches a log line.
SECRET_PARAM = re.compile(r"(?i)([?&][^=&]*(?:token|secret|password|key|auth)[^=&]*=)[^&]*")


class RedactSecrets(logging.Filter):
    """uvicorn's access log writes each request's path with its query string; a client that puts
    the admin token there (``?token=...``) must not leave it in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(SECRET_PARAM.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def configure_logging(level: str = "INFO") -> None:
    """Give the root logger a handler unless one is configured already (uvicorn, pytest)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format=FORMAT)
    logging.getLogger("service").setLevel(level)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSecrets) for f in access.filters):
        access.addFilter(RedactSecrets())
