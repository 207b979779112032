"""Small pure-ASGI middlewares: request metrics, a true ``Allow`` on 405, a readable start-up failure."""

from __future__ import annotations

import time
from collections.abc import Iterator

from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}


class MetricsMiddleware:
    """Counts requests by endpoint (route template), method and status; times them; in-flight."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if an exception escapes the app

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.observe_request(endpoint, method, status, time.perf_counter() - t0)


def _flat(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes themselves: FastAPI (0.165 here) lists an included router as one entry that
    holds the router's routes (``original_router``); the paths inside are already complete, as
    the service includes its routers without a prefix."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route


def allowed_methods(routes: list[BaseRoute], scope: Scope) -> list[str]:
    """The methods the documented routes accept on this request's path (all of them)."""
    methods: set[str] = set()
    for route in _flat(routes):
        documented = isinstance(route, Route) and route.include_in_schema and route.methods
        if documented and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


class AllowHeaderMiddleware:
    """Every 405 names in ``Allow`` what the path accepts, over all of its routes (RFC 9110).

    Starlette's own 405 lists only the methods of the first route whose path matched, so a path
    with a GET and a PUT route (``/admin/tau``) answered ``Allow: GET``; a router's catch-all
    route (``/v2/...``) may add none. Only documented routes count, so catch-alls do not.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = allowed_methods(scope["app"].routes, scope)
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                headers.append((b"allow", ", ".join(methods).encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_allow)


class StartupFailureMiddleware:
    """Replace the traceback Starlette reports for a failed start-up with the reason alone.

    The lifespan stores a ``StartupError``'s text in ``app.state.startup_error`` (a broken package,
    bad settings); uvicorn then logs ``cannot start: <reason>`` and exits, instead of printing a
    page of traceback. Any other start-up exception keeps its full traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_readable(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                reason = getattr(scope["app"].state, "startup_error", None)
                if reason:
                    message = {**message, "message": f"cannot start: {reason}"}
            await send(message)

        await self.app(scope, receive, send_readable)


class HeadAsGet:
    """HEAD is GET without the body (RFC 9110 9.3.2). FastAPI's routes answer only the methods
    they list, so HEAD on a GET route was a 405; here it is routed as GET and the server (uvicorn)
    sends the headers alone. Metrics and logs still see HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
