"""``python -m service``: serve ``service.app:app`` with uvicorn on CPCNN_HOST:CPCNN_PORT."""

from __future__ import annotations

import logging
import sys

import uvicorn

from service.app import app as application
from service.app import resolve_settings
from service.errors import StartupError
from service.logconfig import configure_logging

logger = logging.getLogger("service")


def main() -> int:
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
