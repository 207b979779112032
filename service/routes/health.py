"""Liveness and readiness (separate on purpose: alive while loading, ready once warmed up)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import OptionalServiceDep
from service.schemas import Health, ModelRef, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, summary="Readiness: package loaded and warmed up",
            responses={503: {"model": Readiness, "description": "Not loaded yet, or shutting down."}})
async def readyz(service: OptionalServiceDep) -> Readiness | JSONResponse:
    if service is None or not service.ready:
        return JSONResponse(Readiness(status="not_ready").model_dump(), status_code=503)
    m = service.manifest
    return Readiness(status="ready", model=ModelRef(name=m.name, version=m.version))
