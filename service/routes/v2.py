"""Open Inference Protocol (KServe V2) REST endpoints, with Triton's binary tensor data extension.

The official clients (``tritonclient.http``, KServe's) talk to this router unchanged. Inference
goes through the same ``InferenceService`` as ``/classify`` (decode path, micro-batcher, metrics)
and the same response builder (``classify_response``), so both endpoints answer alike; this module
only translates between V2 tensors and those calls:

1. read the body under ``CPCNN_MAX_BODY_BYTES`` (gzip/deflate ``Content-Encoding`` undone, still
   under the limit), split it at ``Inference-Header-Content-Length`` into the JSON header and the
   binary tensor data that follows it,
2. parse the header (``InferenceRequest``) and its one input in a worker thread: ``image`` BYTES
   ``[N]`` (encoded files; base64 strings in JSON, 4-byte little-endian length + bytes per element
   in binary) or ``pixels`` UINT8 ``[N, H, W, 3]``,
3. classify, then encode the requested outputs as JSON data or binary after the JSON header.

Every error of a ``/v2`` route is answered in the protocol's shape ``{"error": "..."}``
(``V2Route``); bad input is a 400 (413 over a limit), never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.routing import Match

from service.deps import OptionalServiceDep, ReadyServiceDep, SettingsDep
from service.errors import (
    InvalidParameter,
    InvalidRequest,
    LimitExceeded,
    ServiceError,
    UnsupportedMediaType,
    describe_validation_errors,
    status_for,
)
from service.manifest import Manifest
from service.routes.classify import query_target, server_timing
from service.runtime import ImageInput, InferenceService, Mode, check_tau
from service.schemas import ClassifyResponse, classify_response
from service.settings import Settings
from service.sweep import TARGET_KINDS, Target
from service.upload import (  # the body limits of /classify, shared
    body_too_large,
    check_declared_length,
    limited_stream,
    parse_length,
)
from service.v2_schemas import (
    EXTENSIONS,
    IMAGE_INPUT,
    OUTPUT_DATATYPES,
    OUTPUTS,
    PIXELS_INPUT,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelMetadata,
    ModelReadyResponse,
    Parameters,
    ReadyResponse,
    ServerMetadata,
    V2Error,
    inline_schema,
    model_metadata,
)

logger = logging.getLogger(__name__)

SERVER_NAME = "cpcnn-serve"
HEADER_LENGTH = "Inference-Header-Content-Length"
HOW_TO_SEND = (f"send exactly one input: '{IMAGE_INPUT}' (BYTES, shape [N]: encoded JPEG/PNG/... "
               f"files, base64 strings in JSON data) or '{PIXELS_INPUT}' (UINT8, shape "
               "[N, H, W, 3]: RGB pixels)")


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
@dataclass(frozen=True)
class InferCall:
    """A parsed V2 inference request, in the service's terms."""

    id: str | None
    tau: float | None
    target: Target | None  # parameters target_flop_saving | target_max_top1_loss | target_mflops
    mode: Mode
    top_k: int | None
    images: list[ImageInput] | None  # input 'image'
    pixels: np.ndarray | None  # input 'pixels', (N, H, W, 3) uint8
    outputs: list[tuple[str, bool]]  # (output name, as binary data)


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


# -- reading the request ---------------------------------------------------------------------
async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    check_declared_length(request, limit)
    return b"".join([chunk async for chunk in limited_stream(request, limit, timeout_s)])


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a gzip/deflate ``Content-Encoding`` (tritonclient's request compression), ≤ ``limit``."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted: send the "
                                   "request uncompressed, gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidRequest(f"the {encoding} request body could not be decompressed ({e})") from e
    if len(data) > limit:
        raise body_too_large(limit)
    if not inflater.eof:
        raise InvalidRequest(f"the {encoding} request body is truncated")
    return data


def parse_infer_request(body: bytes, header_length: str | None, encoding: str,
                        settings: Settings) -> InferCall:
    """Body bytes → ``InferCall``, or ``InvalidRequest``/``InvalidParameter``/``LimitExceeded``."""
    header, binary = split_body(decompress(body, encoding, settings.max_body_bytes), header_length)
    req = parse_header(header)
    params = req.parameters or {}
    tau, mode, top_k = _tau(params.get("tau")), _mode(params.get("mode")), _top_k(params.get("top_k"))
    target = _target(params)
    outputs = _outputs(req, _flag(params, "binary_data_output", "request parameter"))
    images, pixels = read_input(req, binary, header_length is not None, settings.max_files)
    return InferCall(id=req.id, tau=tau, target=target, mode=mode, top_k=top_k, images=images,
                     pixels=pixels,
                     outputs=outputs)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data): the whole body is JSON without the extension's header."""
    if header_length is None:
        return body, b""
    n = parse_length(header_length, HEADER_LENGTH)
    if n > len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} must be the byte length of the JSON header (at "
                             f"most the body's {len(body)} bytes), got {n}")
    return body[:n], body[n:]


def parse_header(header: bytes) -> InferenceRequest:
    if not header.strip():
        raise InvalidRequest(f"the request has no JSON inference request: {HOW_TO_SEND}")
    try:
        raw = json.loads(header)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise InvalidRequest(f"the inference request is not valid JSON ({e})") from e
    try:
        return InferenceRequest.model_validate(raw)
    except ValidationError as e:
        raise InvalidRequest("invalid inference request: "
                             + describe_validation_errors(e.errors(), where="body")) from e


def read_input(req: InferenceRequest, binary: bytes, has_header_length: bool,
               max_files: int) -> tuple[list[ImageInput] | None, np.ndarray | None]:
    """The request's one input: (encoded images, None) or (None, (N, H, W, 3) uint8 pixels)."""
    if len(req.inputs) != 1:
        raise InvalidRequest(f"got {len(req.inputs)} inputs: {HOW_TO_SEND}")
    tensor = req.inputs[0]
    if tensor.name not in (IMAGE_INPUT, PIXELS_INPUT):
        raise InvalidRequest(f"unknown input {tensor.name!r}: {HOW_TO_SEND}")
    expected = "BYTES" if tensor.name == IMAGE_INPUT else "UINT8"
    if tensor.datatype != expected:
        raise InvalidRequest(f"input {tensor.name!r} must have datatype {expected}, got "
                             f"{tensor.datatype!r}: {HOW_TO_SEND}")
    tparams = tensor.parameters or {}
    if "shared_memory_region" in tparams:
        raise InvalidRequest("shared-memory inputs are not supported: send the data in the body")
    size = tparams.get("binary_data_size")
    if size is None:
        if binary:
            raise InvalidRequest(f"{len(binary)} bytes of binary data follow the JSON header but "
                                 "no input declares parameters.binary_data_size")
        if tensor.data is None:
            raise InvalidRequest(f"input {tensor.name!r} has neither 'data' nor "
                                 "parameters.binary_data_size")
    else:
        if not has_header_length:
            raise InvalidRequest(f"input {tensor.name!r} declares binary_data_size but the request "
                                 f"has no {HEADER_LENGTH} header")
        if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
            raise InvalidRequest(f"input {tensor.name!r} declares binary_data_size {size!r} but "
                                 f"{len(binary)} bytes follow the JSON header")
        if tensor.data is not None:
            raise InvalidRequest(f"input {tensor.name!r} has both 'data' and binary_data_size")
    n = tensor.shape[0] if tensor.shape else 0
    if n > max_files:
        raise LimitExceeded(f"{n} images in one request, more than {max_files} (CPCNN_MAX_FILES): "
                            "split them over several requests", code="too_many_files")
    if tensor.name == IMAGE_INPUT:
        if tensor.shape not in ([n], [n, 1]) or n < 1:
            raise InvalidRequest(f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1] with "
                                 f"N >= 1 (one element per image), got {tensor.shape}")
        blobs = _split_bytes(binary, n) if size is not None else _base64_elements(tensor.data, n)
        return [ImageInput(b, name=f"element {i} of input {IMAGE_INPUT!r}")
                for i, b in enumerate(blobs)], None
    if len(tensor.shape) != 4 or tensor.shape[3] != 3 or 0 in tensor.shape:
        raise InvalidRequest(f"input {PIXELS_INPUT!r} must have shape [N, H, W, 3] with every "
                             f"dimension >= 1 (RGB pixels), got {tensor.shape}")
    if size is not None:
        return None, _binary_pixels(binary, tensor.shape)
    return None, _json_pixels(tensor.data, tensor.shape)


def _tau(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameter(f"parameter 'tau' must be a number in [0, 1], got {value!r}")
    return check_tau(value)


def _target(params: Parameters) -> Target | None:
    """The one ``target_<kind>`` request parameter, as a ``Target`` (``/classify``'s query)."""
    values = {kind: params.get(f"target_{kind}") for kind in TARGET_KINDS}
    for kind, value in values.items():  # V2 parameters are untyped JSON: check what the Query checks
        number = (not isinstance(value, bool) and isinstance(value, int | float)
                  and math.isfinite(value))
        if value is not None and not (number and (value > 0 if kind == "mflops"
                                                  else 0 <= value <= 1)):
            bound = "a number > 0" if kind == "mflops" else "a number in [0, 1]"
            raise InvalidParameter(f"parameter 'target_{kind}' must be {bound}, got {value!r}")
    return query_target(**values)


def _mode(value: Any) -> Mode:
    if value is None:
        return "conditional"
    if value not in ("conditional", "original"):
        raise InvalidParameter(f"parameter 'mode' must be 'conditional' or 'original', "
                               f"got {value!r}")
    return value


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameter(f"parameter 'top_k' must be an integer >= 1, got {value!r}")
    return value


def _flag(params: Parameters, key: str, where: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidParameter(f"{where} {key!r} must be true or false, got {value!r}")
    return value


def _outputs(req: InferenceRequest, binary_default: bool) -> list[tuple[str, bool]]:
    """(name, binary) per requested output; every output when the request names none."""
    if not req.outputs:
        return [(name, binary_default) for name in OUTPUTS]
    seen: list[tuple[str, bool]] = []
    for out in req.outputs:
        if out.name not in OUTPUTS:
            raise InvalidRequest(f"unknown output {out.name!r}; outputs: {', '.join(OUTPUTS)}")
        if any(out.name == name for name, _ in seen):
            raise InvalidRequest(f"output {out.name!r} is requested twice")
        oparams = out.parameters or {}
        if "classification" in oparams:
            raise InvalidRequest("the classification extension is not supported: request "
                                 "top_k_indices/top_k_scores/labels and parameter top_k")
        if "shared_memory_region" in oparams:
            raise InvalidRequest("shared-memory outputs are not supported")
        where = f"output {out.name!r} parameter"
        seen.append((out.name, _flag(oparams, "binary_data", where, binary_default)))
    return seen


def _split_bytes(buffer: bytes, n: int) -> list[bytes]:
    """Triton's BYTES serialization: per element a 4-byte little-endian length, then the bytes."""
    view, items, pos = memoryview(buffer), [], 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise InvalidRequest(f"binary data of input {IMAGE_INPUT!r} ends inside the 4-byte "
                                 f"length of element {len(items)}")
        (length,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + length > len(view):
            raise InvalidRequest(f"element {len(items)} of input {IMAGE_INPUT!r} declares "
                                 f"{length} bytes but only {len(view) - pos} follow")
        items.append(bytes(view[pos:pos + length]))
        pos += length
    if len(items) != n:
        raise InvalidRequest(f"input {IMAGE_INPUT!r} has shape [{n}] but its binary data holds "
                             f"{len(items)} elements")
    return items


def _base64_elements(data: list[Any] | None, n: int) -> list[bytes]:
    flat: list[Any] = []
    for x in data or []:  # [N] or [N, 1]
        flat.extend(x if isinstance(x, list) else [x])
    if len(flat) != n:
        raise InvalidRequest(f"input {IMAGE_INPUT!r} has shape [{n}] but {len(flat)} data "
                             "elements")
    blobs = []
    for i, x in enumerate(flat):
        if not isinstance(x, str):
            raise InvalidRequest(f"element {i} of input {IMAGE_INPUT!r} must be a base64 string "
                                 f"of an encoded image, got {type(x).__name__}")
        try:
            blobs.append(base64.b64decode(x, validate=True))
        except (binascii.Error, ValueError) as e:
            raise InvalidRequest(f"element {i} of input {IMAGE_INPUT!r} is not valid base64 "
                                 f"({e}); JSON BYTES data are base64-encoded files") from e
    return blobs


def _binary_pixels(buffer: bytes, shape: list[int]) -> np.ndarray:
    if len(buffer) != math.prod(shape):
        raise InvalidRequest(f"input {PIXELS_INPUT!r} has shape {shape} ({math.prod(shape)} "
                             f"bytes) but {len(buffer)} bytes of binary data")
    return np.frombuffer(buffer, dtype=np.uint8).reshape(shape)  # (N, H, W, 3)


def _json_pixels(data: list[Any] | None, shape: list[int]) -> np.ndarray:
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as e:  # ragged nesting, ...
        raise InvalidRequest(f"data of input {PIXELS_INPUT!r} is not a flat or nested list of "
                             f"integers ({e})") from e
    if values.size != math.prod(shape):
        raise InvalidRequest(f"input {PIXELS_INPUT!r} has shape {shape} ({math.prod(shape)} "
                             f"values) but {values.size} data values")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise InvalidRequest(f"data of input {PIXELS_INPUT!r} must be integers in [0, 255]")
    return values.astype(np.uint8).reshape(shape)  # (N, H, W, 3)


# -- writing the response --------------------------------------------------------------------
def encode_response(call: InferCall, result: ClassifyResponse, scores: np.ndarray) -> Response:
    """The V2 response: JSON, or JSON + binary outputs when any output is binary."""
    results = result.results
    tensors: dict[str, np.ndarray] = {
        "probabilities": scores.astype(np.float32),  # (N, C)
        "top_k_indices": np.array([[p.index for p in r.predictions] for r in results],
                                  dtype=np.int64),  # (N, k)
        "top_k_scores": np.array([[p.score for p in r.predictions] for r in results],
                                 dtype=np.float32),  # (N, k)
        "labels": np.array([[p.class_name for p in r.predictions] for r in results],
                           dtype=np.object_),  # (N, k)
    }
    outputs, blobs = [], []
    for name, binary in call.outputs:
        array, datatype = tensors[name], OUTPUT_DATATYPES[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = _tensor_bytes(array, datatype)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    body: dict[str, Any] = {"model_name": result.model.name,
                            "model_version": result.model.version}
    if call.id is not None:
        body["id"] = call.id
    body["parameters"] = response_parameters(result)
    body["outputs"] = outputs
    header = json.dumps(body).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def _tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        encoded = [str(s).encode() for s in array.ravel()]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    little_endian = {"FP32": "<f4", "INT64": "<i8"}[datatype]
    return np.ascontiguousarray(array, dtype=little_endian).tobytes()


def response_parameters(result: ClassifyResponse) -> dict[str, bool | int | float | str]:
    """FLOPs, heads and latency of the request; structured values as JSON strings (V2 allows
    only bool/number/string parameter values)."""
    flops_total = sum(r.flops.total for r in result.results)
    flops_original = sum(r.flops.original for r in result.results)
    params: dict[str, bool | int | float | str] = {"mode": result.mode, "top_k": result.top_k}
    if result.tau is not None:
        params["tau"] = result.tau
    params.update(flops_total=flops_total, flops_original=flops_original,
                  flop_saving=1.0 - flops_total / flops_original if flops_original else 0.0)
    if result.mode == "conditional":
        params["heads"] = json.dumps([[[h.head, h.weight] for h in r.heads or []]
                                      for r in result.results])
    params["flops"] = json.dumps([r.flops.model_dump() for r in result.results])
    params["latency_ms"] = json.dumps({stage: round(seconds * 1000, 4) for stage, seconds
                                       in result.latency.model_dump(exclude_none=True).items()})
    return params
