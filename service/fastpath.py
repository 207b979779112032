"""``POST /classify`` without FastAPI's routing, dependency solving and query validation, for the
requests that need none of them.

On the 2-core machine FastAPI's machinery around the endpoint (the exception and exit-stack
middlewares, matching the path among the routes, solving three dependencies, validating three
query parameters with pydantic) cost 0.1-0.6 ms of a 3.5-5 ms request at c=1, and under load it
runs on the event loop beside the model: side by side in the bench, the app without the fast path
served 10-11% fewer requests at c=8 and c=32 (bench/README.md).

The fast path takes a request only when FastAPI would have nothing to decide: a ready service, the
path exactly ``/classify`` with no root path, and a query whose parameters are spelled plainly
(``plain_query``). Everything else, including every query FastAPI would reject or coerce, goes on
to FastAPI unchanged. A request it takes runs ``classify_images``, the very function the route
runs, and a ``ServiceError`` is answered by the same function as the app's handler; the outer
middlewares (metrics, errors) see it like any other request.
"""

from __future__ import annotations

import re
from typing import Any, get_args

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError, service_error_response
from service.routes import classify
from service.routes.classify import classify_images
from service.runtime import Mode

PATH = "/classify"
_MODES = get_args(Mode)
_TOP_K = re.compile(r"[1-9][0-9]{0,5}")
_TAU = re.compile(r"0(\.[0-9]{1,12})?|1(\.0{1,12})?")


def plain_query(query: str) -> dict[str, Any] | None:
    """``top_k``, ``tau`` and ``mode`` of a query string in their plainest spelling (``top_k=5``,
    ``tau=0.35``, ``mode=original``; other names are ignored, as FastAPI ignores them), or None
    for anything FastAPI should read itself: a repeated parameter, an empty value, ``tau=.5``,
    ``top_k=05``, a value out of range, an encoded name."""
    args: dict[str, Any] = {"top_k": None, "tau": None, "mode": "conditional"}
    seen: set[str] = set()
    for pair in query.split("&") if query else ():
        key, sep, value = pair.partition("=")
        if key not in args:
            if "%" in key or "+" in key:  # an encoded name could spell one of ours
                return None
            continue
        if not sep or key in seen:
            return None
        seen.add(key)
        if key == "top_k" and _TOP_K.fullmatch(value):
            args["top_k"] = int(value)
        elif key == "tau" and _TAU.fullmatch(value):
            args["tau"] = float(value)
        elif key == "mode" and value in _MODES:
            args["mode"] = value
        else:
            return None
    return args


# The route FastAPI would have matched: the request metrics take their endpoint label from it.
CLASSIFY_ROUTE = next(r for r in classify.router.routes
                      if isinstance(r, Route) and r.path == PATH and "POST" in (r.methods or ()))


class ClassifyFastPath:
    """Serves plainly spelled ``POST /classify`` requests itself; passes every other one on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        args = self._plain(scope)
        if args is None:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        scope["route"] = CLASSIFY_ROUTE
        request = Request(scope, receive)
        try:
            response = await classify_images(request, state.service, state.settings, **args)
        except ServiceError as exc:
            response = service_error_response(request, exc)
        await response(scope, receive, send)

    def _plain(self, scope: Scope) -> dict[str, Any] | None:
        """The request's parameters when the fast path may take it, else None."""
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PATH
                and not scope.get("root_path")):
            return None
        state = scope["app"].state
        service, settings = getattr(state, "service", None), getattr(state, "settings", None)
        if service is None or not service.serving or settings is None:
            return None  # FastAPI answers 503 model_not_ready, or whatever applies
        if not settings.classify_fast_path:
            return None
        return plain_query(scope["query_string"].decode("latin-1"))
