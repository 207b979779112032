"""Open Inference Protocol (KServe V2) REST endpoints, with Triton's binary tensor data extension.

The official clients (``tritonclient.http``, KServe's) talk to this router unchanged. Inference
goes through the same ``InferenceService`` as ``/classify`` (decode path, micro-batcher, metrics)
and the same response builder (``classify_response``), so both endpoints answer alike. The router
reads the body (the limits of ``/classify``, ``service.upload.read_body``), hands it to the codec
(``service.v2_codec``: tensors ↔ the service's terms; parsed in a worker thread unless small), runs
it and answers.

Every error of a ``/v2`` route is answered in the protocol's shape ``{"error": "..."}``
(``V2Route``); bad input is a 400 (413 over a limit), never a 5xx.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match

from modelpack.manifest import Manifest
from service.deps import OptionalServiceDep, ReadyServiceDep, SettingsDep
from service.errors import (
    ServiceError,
    describe_validation_errors,
    status_for,
)
from service.routes.classify import server_timing
from service.runtime import InferenceService
from service.schemas import classify_response
from service.upload import (
    read_body,  # the body limits of /classify, shared
)
from service.v2_codec import parse_infer_request
from service.v2_response import encode_response
from service.v2_schemas import (
    EXTENSIONS,
    HEADER_LENGTH,
    IMAGE_INPUT,
    OUTPUTS,
    PIXELS_INPUT,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelMetadata,
    ModelReadyResponse,
    ReadyResponse,
    ServerMetadata,
    V2Error,
    inline_schema,
    model_metadata,
)

logger = logging.getLogger(__name__)

SERVER_NAME = "cpcnn-serve"


# -- errors in the V2 shape ------------------------------------------------------------------
class ModelNotFound(ServiceError):
    """A model name or version this server does not serve (V2 routes only)."""

    code = "model_not_found"


def v2_status(error: ServiceError) -> int:
    """The domain mapping of ``service.errors``, with the protocol's 400 for bad parameters."""
    if isinstance(error, ModelNotFound):
        return 404
    status = status_for(error)
    return 400 if status == 422 else status


def v2_error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class V2Route(APIRoute):
    """Answers every error of a V2 route as ``{"error": "..."}``, as V2 clients expect."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def v2_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as e:
                return v2_error(e.message, v2_status(e), e.headers)
            except RequestValidationError as e:
                return v2_error(describe_validation_errors(e.errors()), 400)
            except Exception:
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                return v2_error("internal server error; the incident was logged", 500)

        return v2_handler


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error} for code in (400, 404, 413, 415, 503)}
router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route)


def served_manifest(service: InferenceService, name: str, version: str | None,
                    m: Manifest | None = None) -> Manifest:
    """The manifest of the model ``name`` (at ``version``), or ``ModelNotFound``; ``m``: check
    against this manifest (the snapshot a request runs on) instead of the served one now."""
    m = service.manifest if m is None else m
    if name != m.name:
        raise ModelNotFound(f"unknown model {name!r}: this server serves {m.name!r}")
    if version is not None and version != m.version:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: [{m.version!r}]")
    return m


# -- health and metadata ---------------------------------------------------------------------
@router.get("/health/live", response_model=LiveResponse, summary="V2 server live")
async def server_live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get("/health/ready", response_model=ReadyResponse, summary="V2 server ready",
            responses={400: {"model": ReadyResponse, "description": "Not loaded yet."}})
async def server_ready(service: OptionalServiceDep) -> ReadyResponse | JSONResponse:
    if service is None or not service.ready:  # the protocol: 200 is true, 4xx is false
        return JSONResponse(ReadyResponse(ready=False).model_dump(), status_code=400)
    return ReadyResponse(ready=True)


@router.get("", response_model=ServerMetadata, summary="V2 server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


@router.get("/models/{name}/ready", response_model=ModelReadyResponse, summary="V2 model ready",
            responses={400: {"model": ModelReadyResponse, "description": "Not loaded yet."},
                       404: {"model": V2Error}})
@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReadyResponse,
            include_in_schema=False)
async def model_ready(service: OptionalServiceDep, name: str,
                      version: str | None = None) -> ModelReadyResponse | JSONResponse:
    if service is None or not service.ready:
        return JSONResponse(ModelReadyResponse(name=name, ready=False).model_dump(),
                            status_code=400)
    served_manifest(service, name, version)
    return ModelReadyResponse(name=name, ready=True)


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS,
            summary="V2 model metadata")
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata,
            include_in_schema=False)
async def get_model_metadata(service: ReadyServiceDep, name: str,
                             version: str | None = None) -> ModelMetadata:
    m = served_manifest(service, name, version)
    return model_metadata(m.name, m.version, len(m.class_names))


# -- inference -------------------------------------------------------------------------------
INLINE_PARSE_MAX_BYTES = 64 * 1024

_INFER_DOC = {
    "requestBody": {
        "required": True,
        "description": "An inference request. With the binary tensor data extension the JSON is "
        f"followed by the raw tensor bytes and its length is given in the `{HEADER_LENGTH}` "
        "header; each input with binary data says how many bytes in `parameters.binary_data_size`.",
        "content": {
            "application/json": {"schema": inline_schema(InferenceRequest)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/models/{name}/infer", responses={200: {"model": InferenceResponse}, **ERRORS},
             openapi_extra=_INFER_DOC, summary="V2 inference",
             description=f"Classify images sent as input '{IMAGE_INPUT}' (BYTES) or "
             f"'{PIXELS_INPUT}' (UINT8 [N, H, W, 3]). Outputs: {', '.join(OUTPUTS)}. Request "
             "parameters: tau (or one of target_flop_saving, target_max_top1_loss, "
             "target_mflops), mode, top_k. Response parameters carry FLOPs, heads and stage "
             "latency; see service/README.md.")
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, service: ReadyServiceDep, settings: SettingsDep, name: str,
                version: str | None = None) -> Response:
    t0 = time.perf_counter()
    # One snapshot for the name check and the run: a reload while the body streams in must not
    # make another package answer for the model this request named.
    snapshot = service.snapshot()
    served_manifest(service, name, version, snapshot[0].manifest)
    with service.admission.request():  # before the body is read: refused at once when full
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        parse = partial(parse_infer_request, body, request.headers.get(HEADER_LENGTH),
                        request.headers.get("content-encoding", ""), settings)
        # A small plain body parses faster than a hop to a worker thread and back; a large or
        # compressed one is parsed off the event loop.
        inline = len(body) <= INLINE_PARSE_MAX_BYTES and not request.headers.get("content-encoding")
        call = parse() if inline else await anyio.to_thread.run_sync(parse)
        if call.pixels is not None:
            outcome = await service.classify_pixels(call.pixels, tau=call.tau, target=call.target,
                                                    mode=call.mode, snapshot=snapshot)
        else:
            assert call.images is not None
            outcome = await service.classify(call.images, tau=call.tau, target=call.target,
                                             mode=call.mode, snapshot=snapshot)
    result = classify_response(outcome, call.top_k or settings.default_top_k,
                               time.perf_counter() - t0)
    scores = np.stack([image.prediction.scores for image in outcome.images])  # (N, C)
    response = encode_response(call, result, scores)
    response.headers["Server-Timing"] = server_timing(result.latency)
    return response


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@router.api_route("", methods=_ALL_METHODS, include_in_schema=False)
@router.api_route("/{path:path}", methods=_ALL_METHODS, include_in_schema=False)
async def no_such_endpoint(request: Request, path: str = "") -> JSONResponse:
    """404/405 in the V2 shape for any other path under /v2 (must stay the router's last route)."""
    if any(route.matches(request.scope)[0] is Match.PARTIAL for route in router.routes):
        return v2_error(f"{request.method} is not allowed on {request.url.path}", 405)
    return v2_error(f"no V2 endpoint {request.method} {request.url.path}; this server implements "
                    "health, metadata and infer (see /docs)", 404)
