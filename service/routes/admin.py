"""Admin endpoints, all behind one bearer-token dependency (``service.deps.require_admin``).

Bodies are parsed inside the handlers, after the token check, so a client without the token
learns nothing from a body's validation (FastAPI would parse a JSON body before dependencies).
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError

from modelpack.sweep import expected_at
from service.admin_schemas import (
    ControllerStatus,
    Reloaded,
    ReloadRequest,
    TauChanged,
    TauState,
    TauUpdate,
    expected_figures,
)
from service.deps import ReadyServiceDep, SettingsDep, require_admin
from service.errors import InvalidParameter, describe_validation_errors
from service.fleet import publish_reload
from service.json_fields import CONFLICTING
from service.packages import resolve_package_dir
from service.schemas import ModelRef, error_responses
from service.tau_controller import ControllerConfig
from service.tau_input import check_tau, tau_for
from service.upload import read_body

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=error_responses(401, 404, 503))

Body = TypeVar("Body", bound=BaseModel)


def _json_body_doc(model: type[BaseModel], example: dict) -> dict:
    """The body's schema for ``openapi_extra``, with the models it nests written in place (a
    reference into its ``$defs`` would point at the OpenAPI document's root)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return {**inline(defs[node["$ref"].rsplit("/", 1)[-1]]),
                        **{k: inline(v) for k, v in node.items() if k != "$ref"}}
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline(schema), "example": example}}}}


ADMIN_MAX_BODY_BYTES = 64 * 1024  # an admin body is a line of JSON


async def _parse(request: Request, model: type[Body], example: str, timeout_s: float) -> Body:
    body = await read_body(request, ADMIN_MAX_BODY_BYTES, timeout_s)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors()
        conflict = all(err["type"] == CONFLICTING for err in errors)  # values fine, not together
        raise InvalidParameter(
            f"{describe_validation_errors(errors, where='body')}; send JSON like {example}",
            code=CONFLICTING if conflict else None) from e


@router.get("/tau", response_model=TauState, summary="Current τ and what the sweep predicts for it")
async def get_tau(service: ReadyServiceDep) -> TauState:
    runner, tau = service.snapshot()
    m = runner.manifest
    return TauState(tau=tau, default_tau=m.activator.default_tau,
                    expected=expected_figures(expected_at(m, tau)))


@router.put("/tau", response_model=TauChanged, responses=error_responses(422),
            openapi_extra=_json_body_doc(TauUpdate, {"tau": 0.7}),
            summary="Set τ for requests that start from now on, or choose it from a target",
            description="Body `{\"tau\": 0.7}` (τ in [0, 1]) or one target: "
            "`{\"target\": {\"flop_saving\": 0.4}}` (the most accurate τ that saves at least "
            "40% of the original's FLOPs), `{\"target\": {\"max_top1_loss\": 0.005}}` (the "
            "cheapest τ within half a point of the original's top-1) or "
            "`{\"target\": {\"mflops\": 600}}` (the most accurate τ within 600 MFLOPs an "
            "image). Targets are met on the offline τ sweep, linearly interpolated between swept "
            "τs; one no τ meets is 422 `target_unreachable`, naming the best reachable value. "
            "Answers with the τ set and the accuracy and FLOP saving the sweep predicts there.")
async def put_tau(request: Request, service: ReadyServiceDep, settings: SettingsDep) -> TauChanged:
    update = await _parse(request, TauUpdate, '{"tau": 0.7} with tau in [0, 1], or '
                          '{"target": {"flop_saving": 0.4}}', settings.body_timeout_s)
    m = service.manifest
    if update.target is not None:
        tau = tau_for(m, update.target.to_target()).tau
    else:
        assert update.tau is not None  # TauUpdate holds exactly one of the two
        tau = check_tau(update.tau)  # as it is stored: -0.0 comes back as 0.0
    stopping = service.control.active
    fleet = request.app.state.fleet
    if fleet is None:
        previous = service.set_tau(tau)  # no await since reading m: a reload cannot swap in between
    else:  # every replica, this one included, sets it (service.fleet)
        previous = service.tau
        await fleet.publish(tau=tau)
    return TauChanged(tau=tau, previous=previous, default_tau=m.activator.default_tau,
                      expected=expected_figures(expected_at(m, tau)), controller_stopped=stopping,
                      target=update.target and update.target.model_dump(exclude_none=True))


@router.get("/tau/controller", response_model=ControllerStatus, response_model_exclude_none=True,
            summary="The τ controller's state, target and last measurement")
async def get_controller(service: ReadyServiceDep) -> ControllerStatus:
    return ControllerStatus.of(service.control.controller, service.tau)


@router.put("/tau/controller", response_model=ControllerStatus, response_model_exclude_none=True,
            responses=error_responses(422),
            openapi_extra=_json_body_doc(ControllerConfig, {"p95_ms": 40, "tau_min": 0.3}),
            summary="Start (or reconfigure) the τ controller",
            description="Body `{\"p95_ms\": 40}` (hold the p95 latency of classify requests "
            "at or below 40 ms) or `{\"mflops_per_s\": 20000}` (a compute budget), with "
            "optional `tau_min`, `tau_max` (the bounds τ stays in) and `window_s` (seconds of "
            "requests per decision, default 10). It starts from the current τ; "
            "`PUT /admin/tau` or `DELETE /admin/tau/controller` stops it.")
async def put_controller(request: Request, service: ReadyServiceDep,
                         settings: SettingsDep) -> ControllerStatus:
    config = await _parse(request, ControllerConfig, '{"p95_ms": 40, "tau_min": 0.3}',
                          settings.body_timeout_s)
    service.start_controller(config)
    return ControllerStatus.of(service.control.controller, service.tau)


@router.delete("/tau/controller", response_model=ControllerStatus,
               response_model_exclude_none=True,
               summary="Stop the τ controller; τ stays where it is")
async def delete_controller(service: ReadyServiceDep) -> ControllerStatus:
    service.stop_controller()
    return ControllerStatus.of(None, service.tau)


@router.post("/reload", response_model=Reloaded, responses=error_responses(403, 409, 422),
             openapi_extra=_json_body_doc(ReloadRequest, {"package": "synthetic-v2"}),
             summary="Hot-reload another model package from the models root",
             description="Body `{\"package\": \"<directory name in CPCNN_MODELS_ROOT>\"}`. The "
             "package is loaded, validated (schema, files, sha256) and warmed up while the current "
             "one keeps serving, then swapped in at once; requests in flight finish on the package "
             "they started with. A broken package answers 409 `package_rejected` and the current "
             "one keeps serving; 409 `reload_in_progress` while another reload runs. A name that "
             "is not a plain directory name: 422; no such directory: 404 `package_not_found`; "
             "a symlink out of the models root: 403 `outside_models_root`.")
async def reload_package(request: Request, service: ReadyServiceDep,
                         settings: SettingsDep) -> Reloaded:
    body = await _parse(request, ReloadRequest, '{"package": "<directory in the models root>"}',
                        settings.body_timeout_s)
    assert settings.models_root is not None  # filled in by Settings
    package_dir = resolve_package_dir(settings.models_root, body.package)
    fleet = request.app.state.fleet
    if fleet is None:
        outcome = await service.reload(package_dir)
    else:  # every replica, this one included, reloads (service.fleet)
        outcome = await publish_reload(fleet, service, package_dir)
    m, old = outcome.manifest, outcome.previous
    return Reloaded(model=ModelRef(name=m.name, version=m.version),
                    previous=ModelRef(name=old.name, version=old.version), tau=outcome.tau,
                    default_tau=m.activator.default_tau, seconds=outcome.seconds)
