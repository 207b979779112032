"""Typed dependency aliases shared by the routers.

Every dependency is ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker
thread, and these only read app state, so each thread hop (~0.1 ms on 2 cores) would be pure
overhead on every request.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import AdminDisabled, ModelNotReady, Unauthorized
from service.metrics import Metrics
from service.runtime import InferenceService
from service.settings import Settings, resolve_settings


async def get_app_settings(request: Request) -> Settings:
    """The settings the app started with (``create_app(settings)`` or the environment)."""
    settings = getattr(request.app.state, "settings", None)
    if settings is None:  # before the lifespan ran (an app used without starting it)
        settings = resolve_settings(request.app)
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def get_optional_service(request: Request) -> InferenceService | None:
    """The app's service, or None before the lifespan created it."""
    return getattr(request.app.state, "service", None)


OptionalServiceDep = Annotated[InferenceService | None, Depends(get_optional_service)]


def ready_service(request: Request) -> InferenceService:
    """The service once its package is loaded and warmed up; 503 ``model_not_ready`` before.

    While shutting down (readiness already 503) requests are still served until the server
    closes: a request a load balancer routed here just before is not failed. ``POST /classify``
    calls it directly (FastAPI's dependency solving costs every request; bench/README.md, "Cores");
    the other routes take it as ``ReadyServiceDep``.
    """
    service = getattr(request.app.state, "service", None)
    if service is None or not service.serving:
        raise ModelNotReady("the model is not loaded yet (or shutting down); retry shortly and "
                            "watch GET /readyz")
    return service


async def get_ready_service(request: Request) -> InferenceService:
    """``ready_service`` as a dependency."""
    return ready_service(request)


ReadyServiceDep = Annotated[InferenceService, Depends(get_ready_service)]

_bearer = HTTPBearer(auto_error=False, description="CPCNN_ADMIN_TOKEN")


async def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Guard of the admin router: 404 when no token is configured, 401 on a missing/wrong one."""
    if settings.admin_token is None:
        raise AdminDisabled("admin endpoints are disabled on this server (no CPCNN_ADMIN_TOKEN "
                            "configured)")
    if credentials is None:
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <token>'")
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise Unauthorized("the bearer token is not valid for admin endpoints")
