"""``POST /classify``: images in, top-k labels, heads run, FLOPs and stage latency out."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from modelpack.sweep import Target
from service.deps import ready_service
from service.outcome import Mode
from service.runtime import InferenceService
from service.schemas import ClassifyResponse, Latency, classify_response, error_responses
from service.settings import Settings
from service.tau_input import query_target
from service.upload import read_images

router = APIRouter(tags=["classify"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "Images as repeatable multipart field `file`, or one raw image body. Each "
        "must be a JPEG, PNG, GIF, BMP, WebP, TIFF or PPM image within CPCNN_MAX_IMAGE_PIXELS and "
        "CPCNN_MAX_IMAGE_SIDE; the body within CPCNN_MAX_BODY_BYTES.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"], "additionalProperties": False,
                "properties": {"file": {"type": "array", "minItems": 1,
                                        "items": {"type": "string", "format": "binary"}}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def document_limits(openapi: dict, settings: Settings) -> None:
    """Write this server's configured limits into its OpenAPI schema (``maxItems`` of ``file``)."""
    body = openapi["paths"]["/classify"]["post"]["requestBody"]
    body["content"]["multipart/form-data"]["schema"]["properties"]["file"]["maxItems"] = (
        settings.max_files)
    body["description"] += (f" This server: at most {settings.max_files} files, "
                            f"{settings.max_body_bytes} bytes, {settings.max_image_pixels} pixels "
                            f"and {settings.max_image_side} pixels a side per image.")


def server_timing(latency: Latency) -> str:
    """``decode;dur=1.234, trunk;dur=3.456, ..., total;dur=9.9`` (milliseconds)."""
    stages = latency.model_dump(exclude_none=True)
    return ", ".join(f"{stage};dur={seconds * 1000:.3f}" for stage, seconds in stages.items())


async def classify_images(request: Request, service: InferenceService, settings: Settings,
                          top_k: int | None, tau: float | None, mode: Mode,
                          target: Target | None = None) -> Response:
    """The work of ``POST /classify`` once its parameters are valid: read the images, run them,
    answer."""
    t0 = time.perf_counter()
    with service.admission.request():  # before the body is read: refused at once when full
        images = await read_images(request, max_body_bytes=settings.max_body_bytes,
                                   max_files=settings.max_files,
                                   body_timeout_s=settings.body_timeout_s)
        outcome = await service.classify(images, tau=tau, target=target, mode=mode)
    body = classify_response(outcome, top_k or settings.default_top_k, time.perf_counter() - t0)
    # A ready Response: FastAPI would otherwise validate the model it was just built from again
    # before serialising it (~0.1 ms a request); ``response_model`` still documents the shape.
    return Response(body.model_dump_json(), media_type="application/json",
                    headers={"Server-Timing": server_timing(body.latency)})


class ClassifyQuery(BaseModel):
    """The query parameters of ``POST /classify``, validated as one model in one call.

    FastAPI's own query handling re-inspects every parameter's annotation on every request
    (bench/README.md: ~0.2 ms a request here, a tenth of the model's time); the route validates
    this model itself and documents its fields as the operation's parameters
    (``query_parameters_doc``), so the schema and the checks are the ones FastAPI would make.
    """

    top_k: int | None = Field(default=None, ge=1, description="Labels per image; larger than the "
                              "number of classes is clamped to it. Default: CPCNN_DEFAULT_TOP_K.")
    tau: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False,
                              description="τ for this request only, in [0, 1]; default: the "
                              "server's current τ.")
    mode: Mode = Field(default="conditional",
                       description="conditional (CP-CNN) or original (baseline).")
    target_flop_saving: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Instead of tau: the most accurate τ that saves at least this fraction of the "
        "original's FLOPs, from the package's τ sweep.")
    target_max_top1_loss: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Instead of tau: the cheapest τ that loses at most this much top-1 against "
        "the original (0.005 = half a point), from the package's τ sweep.")
    target_mflops: float | None = Field(
        default=None, gt=0.0, allow_inf_nan=False,
        description="Instead of tau: the most accurate τ that spends at most this many MFLOPs an "
        "image on average, from the package's τ sweep.")


def query_parameters_doc(model: type[BaseModel]) -> list[dict]:
    """OpenAPI parameters for the fields of ``model``, as FastAPI writes declared query params."""
    schema = model.model_json_schema()
    return [{"name": name, "in": "query", "required": name in schema.get("required", []),
             "schema": prop, **({"description": prop["description"]} if "description" in prop else {})}
            for name, prop in schema["properties"].items()]


def parse_query(request: Request) -> ClassifyQuery:
    """The request's query as a ``ClassifyQuery``; bad values are FastAPI's 422, loc ``query``."""
    try:
        return ClassifyQuery.model_validate(request.query_params)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("query", *err["loc"])} for err in e.errors()]) from None


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra={**_BODY_DOC, "parameters": query_parameters_doc(ClassifyQuery)},
    summary="Classify one or more images",
    description="Runs the trunk and clustifier on every image and only the heads the activator "
    "picks at τ (`mode=conditional`), or the original model (`mode=original`, for A/B). τ is the "
    "server's unless the request gives `tau` or one `target_*` (chosen from the package's τ "
    "sweep; the response says which τ ran; an unmeetable target is 422 `target_unreachable`). "
    "Stage latency is also sent in the `Server-Timing` header (milliseconds).",
)
async def classify(request: Request) -> ClassifyResponse:
    service = ready_service(request)
    query = parse_query(request)
    target = query_target(query.target_flop_saving, query.target_max_top1_loss, query.target_mflops)
    return await classify_images(request, service, service.settings, query.top_k,  # type: ignore[return-value]
                                 query.tau, query.mode, target)
