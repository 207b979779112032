"""Admin endpoints, all behind one bearer-token dependency (``service.deps.require_admin``).

The PUT body is parsed inside the handler, after the token check, so a client without the token
learns nothing from the body's validation (FastAPI would parse a JSON body before dependencies).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from service.deps import ReadyServiceDep, require_admin
from service.errors import InvalidParameter, describe_validation_errors
from service.schemas import TauChanged, TauState, TauUpdate, error_responses, expected_figures
from service.sweep import expected_at

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=error_responses(401, 404, 503))

_TAU_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": TauUpdate.model_json_schema(), "example": {"tau": 0.7}}}}}


@router.get("/tau", response_model=TauState, summary="Current τ and what the sweep predicts for it")
async def get_tau(service: ReadyServiceDep) -> TauState:
    m = service.manifest
    tau = service.tau
    return TauState(tau=tau, default_tau=m.activator.default_tau,
                    expected=expected_figures(expected_at(m, tau)))


@router.put("/tau", response_model=TauChanged, responses=error_responses(422),
            openapi_extra=_TAU_BODY_DOC, summary="Set τ for requests that start from now on",
            description="Body `{\"tau\": 0.7}`, τ in [0, 1]. Answers with the accuracy and FLOP "
            "saving the offline τ sweep predicts (linear interpolation between the neighbouring "
            "swept τs).")
async def put_tau(request: Request, service: ReadyServiceDep) -> TauChanged:
    try:
        update = TauUpdate.model_validate_json(await request.body())
    except ValidationError as e:
        raise InvalidParameter(
            f"{describe_validation_errors(e.errors(), where='body')}; send JSON like "
            '{"tau": 0.7} with tau in [0, 1]') from e
    m = service.manifest
    previous = service.set_tau(update.tau)
    return TauChanged(tau=update.tau, previous=previous, default_tau=m.activator.default_tau,
                      expected=expected_figures(expected_at(m, update.tau)))
