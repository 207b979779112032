"""The FastAPI app: ``create_app(settings)`` assembles routers, errors, metrics and the lifespan.

``app = create_app()`` below is what ``uvicorn service.app:app`` serves; it reads no settings and
loads nothing at import. Settings are read and the package is loaded, validated and warmed up in
the lifespan; a broken package or bad settings stop start-up with one line saying what is wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from PIL import Image
from prometheus_client import CollectorRegistry

from service.errors import StartupError, install_error_handlers
from service.logconfig import configure_logging
from service.metrics import Metrics
from service.middleware import (
    AllowHeaderMiddleware,
    HeadAsGet,
    MetricsMiddleware,
    StartupFailureMiddleware,
)
from service.routes import admin, classify, health, model, v2
from service.routes import metrics as metrics_route
from service.runtime import InferenceService
from service.settings import Settings, resolve_settings
from service.shutdown import readiness_first

logger = logging.getLogger(__name__)

try:
    __version__ = version("cpcnn-serve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"


def _warn_unknown_env() -> None:
    known = {f"CPCNN_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(k for k in os.environ if k.startswith("CPCNN_") and k not in known)
    if unknown:
        logger.warning("ignoring unknown environment variables %s (see service/README.md)", unknown)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        settings = resolve_settings(app)
        app.state.settings = settings
        configure_logging(settings.log_level)
        _warn_unknown_env()
        # Pillow's process-wide bomb guard must not fire below our own, per-app limit.
        if Image.MAX_IMAGE_PIXELS is not None and settings.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        service = InferenceService(settings, app.state.metrics)
        app.state.service = service
        await service.start()
    except StartupError as e:
        app.state.startup_error = str(e)
        logger.debug("start-up failed", exc_info=True)
        raise
    try:
        # SIGTERM: readiness 503 at once, serve on for CPCNN_SHUTDOWN_DELAY_S, then uvicorn's
        # graceful shutdown (stop accepting, finish in-flight requests) and the lines below.
        with readiness_first(service.stop, delay=settings.shutdown_delay_s):
            yield
    finally:
        service.stop()  # readiness 503 (if the signal did not turn it already)
        await service.aclose()  # queued micro-batches finish
        logger.info("shut down")


def create_app(settings: Settings | None = None, *,
               registry: CollectorRegistry | None = None) -> FastAPI:
    """A new app. ``settings``: fixed settings (default: ``get_settings()`` at start-up);
    ``registry``: where its metrics go (default: a fresh one, so apps never share series)."""
    app = FastAPI(
        title="CP-CNN Serve",
        version=__version__,
        summary="Cluster-based partitioned CNN inference: a shared trunk and clustifier on every "
        "image, only the hyper-class heads the activator picks, and the FLOPs it saved.",
        lifespan=lifespan,
        # No redirect from '/classify/' to '/classify': Starlette builds its Location from the
        # request's Host header, so any client could make the server point elsewhere.
        redirect_slashes=False,
    )
    metrics = Metrics(registry)
    app.state.metrics = metrics
    app.state.service = None
    app.state.settings = None  # set by the lifespan
    app.state.fleet = None  # replicas sharing τ and the package (service.fleet); None: this process
    app.state.startup_error = None
    # Fixed settings live on the app, not in ``dependency_overrides``: with any override set,
    # FastAPI re-inspects every dependency's signature on every request (0.66 ms a request).
    app.state.fixed_settings = settings
    install_error_handlers(app)
    # Innermost first: the fast path sits inside the metrics and error middlewares, so what it
    # serves is counted and guarded like any other request.
    app.add_middleware(HeadAsGet)
    app.add_middleware(AllowHeaderMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(StartupFailureMiddleware)
    for router in (classify.router, model.router, admin.router, health.router,
                   metrics_route.router, v2.router):
        app.include_router(router)
    _document_limits_in_openapi(app)
    return app


def _document_limits_in_openapi(app: FastAPI) -> None:
    """The OpenAPI schema states this server's configured limits (read once, when first built)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            with contextlib.suppress(StartupError):  # bad settings: the schema without them
                classify.document_limits(schema, resolve_settings(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


app = create_app()
