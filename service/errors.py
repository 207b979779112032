"""Typed domain errors and the one place that maps them to HTTP answers.

Every error a client can cause is a ``ServiceError`` subclass with a stable ``code``; the handlers
installed by ``install_error_handlers`` answer all of them, FastAPI's own validation errors and
Starlette's 404/405 with one JSON shape::

    {"error": {"code": "invalid_image", "message": "what was wrong and what to do"}}

Anything else is logged with its traceback and answered with a generic 500 that leaks nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a stable machine-readable code and a message meant for the client."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # a more specific code than the class's (e.g. "empty_body")
        self.headers = headers


class InvalidImage(ServiceError):
    """Bytes that are not a (supported, complete) image."""

    code = "invalid_image"


class InvalidRequest(ServiceError):
    """A request body that is malformed: empty, no ``file`` part, broken multipart."""

    code = "invalid_request"


class InvalidParameter(ServiceError):
    """A parameter outside its domain (also used for FastAPI's validation errors)."""

    code = "invalid_parameter"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class LimitExceeded(ServiceError):
    """Body too large, too many files, too many pixels (decompression bomb)."""

    code = "limit_exceeded"


class RequestTimeout(ServiceError):
    """The body did not arrive in time (``CPCNN_BODY_TIMEOUT_S``)."""

    code = "body_timeout"


class ClientClosed(ServiceError):
    """The client went away before its request was read: nobody to answer; counted as 499."""

    code = "client_closed"


class Unauthorized(ServiceError):
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class AdminDisabled(ServiceError):
    code = "admin_disabled"


class Forbidden(ServiceError):
    """An admin request for something outside what it may touch (a path out of the models root)."""

    code = "forbidden"


class NotFound(ServiceError):
    """A named thing (a package directory) that does not exist."""

    code = "not_found"


class Conflict(ServiceError):
    """A state change refused: a broken package on reload, a reload already running."""

    code = "conflict"


class ModelNotReady(ServiceError):
    code = "model_not_ready"


class FleetUnavailable(ServiceError):
    """A change the replicas of a scaled-out service could not all apply (``service.fleet``)."""

    code = "fleet_unavailable"


class Overloaded(ServiceError):
    """More work in flight than the admission bounds allow (``service.admission``): retry."""

    code = "overloaded"


class StartupError(RuntimeError):
    """The server cannot start (bad settings, broken package); the text says why."""


# The one mapping from domain errors to HTTP status codes (first match along the MRO).
HTTP_STATUS: dict[type[ServiceError], int] = {
    InvalidImage: 400,
    InvalidRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    AdminDisabled: 404,
    NotFound: 404,
    RequestTimeout: 408,
    Conflict: 409,
    LimitExceeded: 413,
    UnsupportedMediaType: 415,
    InvalidParameter: 422,
    ClientClosed: 499,  # nginx's "client closed request": no answer reaches anyone
    ModelNotReady: 503,
    Overloaded: 503,
    FleetUnavailable: 503,
}

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def status_for(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def describe_validation_errors(errors: Sequence[Any], where: str | None = None) -> str:
    """A pydantic/FastAPI error list as one sentence: ``query parameter 'tau': Input should ...``.

    ``where`` names the part of the request for errors whose location lacks it (pydantic's own).
    """
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        if where is not None:
            loc = [where, *loc]
        where = loc[0] if loc else "request"
        name = ".".join(loc[1:])
        place = {"query": "query parameter", "body": "body field", "path": "path parameter",
                 "header": "header"}.get(where, where)
        label = f"{place} {name!r}" if name else where
        value = e.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) and len(repr(value)) < 60 else ""
        parts.append(f"{label}: {e.get('msg', 'invalid')}{shown}")
    return "; ".join(parts) or "invalid request"


def service_error_response(request: Request, exc: ServiceError) -> JSONResponse:
    """The answer to a ``ServiceError`` (the app's handler, and the /classify fast path's)."""
    status = status_for(exc)
    if status >= 500:
        logger.error("%s %s: %s", request.method, request.url.path, exc.message)
    return JSONResponse(error_body(exc.code, exc.message), status_code=status, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = describe_validation_errors(exc.errors()) + "; see /docs for the accepted values"
        return JSONResponse(error_body(InvalidParameter.code, message), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        else:
            message = str(exc.detail) if exc.status_code < 500 else "internal server error"
        return JSONResponse(error_body(code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal_error", "internal server error; the incident was logged"),
            status_code=500,
        )
