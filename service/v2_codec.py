"""The Open Inference Protocol (KServe V2) request codec: request bytes → ``InferCall``.

Pure translation from V2 tensors (JSON data or Triton's binary tensor data extension) to the
service's terms; ``service.routes.v2`` is the router around it, ``service.v2_response`` writes
the answer and ``service.v2_tensors`` holds the element (de)serialisation both use. Parsing:

1. undo a gzip/deflate ``Content-Encoding`` (still under ``CPCNN_MAX_BODY_BYTES``), split the body
   at ``Inference-Header-Content-Length`` into the JSON header and the binary tensor data,
2. parse the header (``InferenceRequest``) and its one input: ``image`` BYTES ``[N]`` (encoded
   files; base64 strings in JSON, 4-byte little-endian length + bytes per element in binary) or
   ``pixels`` UINT8 ``[N, H, W, 3]``;

Bad input is
``InvalidRequest``/``InvalidParameter``/``LimitExceeded`` (the router answers them as 400/413).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from modelpack.sweep import TARGET_KINDS, Target
from service.errors import (
    InvalidParameter,
    InvalidRequest,
    LimitExceeded,
    UnsupportedMediaType,
    describe_validation_errors,
)
from service.intake import ImageInput
from service.outcome import Mode
from service.settings import Settings
from service.tau_input import check_tau, query_target
from service.upload import (  # the body limits of /classify, shared
    body_too_large,
    parse_length,
)
from service.v2_schemas import (
    HEADER_LENGTH,
    IMAGE_INPUT,
    OUTPUTS,
    PIXELS_INPUT,
    InferenceRequest,
    Parameters,
)
from service.v2_tensors import base64_elements, binary_pixels, json_pixels, split_bytes

HOW_TO_SEND = (f"send exactly one input: '{IMAGE_INPUT}' (BYTES, shape [N]: encoded JPEG/PNG/... "
               f"files, base64 strings in JSON data) or '{PIXELS_INPUT}' (UINT8, shape "
               "[N, H, W, 3]: RGB pixels)")


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
        blobs = split_bytes(binary, n) if size is not None else base64_elements(tensor.data, n)
        return [ImageInput(b, name=f"element {i} of input {IMAGE_INPUT!r}")
                for i, b in enumerate(blobs)], None
    if len(tensor.shape) != 4 or tensor.shape[3] != 3 or 0 in tensor.shape:
        raise InvalidRequest(f"input {PIXELS_INPUT!r} must have shape [N, H, W, 3] with every "
                             f"dimension >= 1 (RGB pixels), got {tensor.shape}")
    if size is not None:
        return None, binary_pixels(binary, tensor.shape)
    return None, json_pixels(tensor.data, tensor.shape)


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
