"""Model metadata: classes, clusters, FLOPs, τ, the τ sweep, training info."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ReadyServiceDep
from service.schemas import BackendInfo, ModelInfo, error_responses, model_info

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelInfo, responses=error_responses(503),
            summary="The served model package")
async def get_model(service: ReadyServiceDep) -> ModelInfo:
    runner, tau = service.snapshot()  # one package and its τ, even across a reload
    b = runner.backend
    return model_info(runner.manifest, tau, BackendInfo(name=b.name, precision=b.precision,
                                                        providers=b.providers))
