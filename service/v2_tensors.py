"""V2 tensor elements ↔ Python: Triton's length-prefixed BYTES, base64 BYTES in JSON, UINT8
pixels as binary or nested JSON lists; and outputs serialised as binary tensor data."""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any

import numpy as np

from service.errors import InvalidRequest
from service.v2_schemas import IMAGE_INPUT, PIXELS_INPUT


def split_bytes(buffer: bytes, n: int) -> list[bytes]:
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


def base64_elements(data: list[Any] | None, n: int) -> list[bytes]:
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


def binary_pixels(buffer: bytes, shape: list[int]) -> np.ndarray:
    if len(buffer) != math.prod(shape):
        raise InvalidRequest(f"input {PIXELS_INPUT!r} has shape {shape} ({math.prod(shape)} "
                             f"bytes) but {len(buffer)} bytes of binary data")
    return np.frombuffer(buffer, dtype=np.uint8).reshape(shape)  # (N, H, W, 3)


def json_pixels(data: list[Any] | None, shape: list[int]) -> np.ndarray:
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


def tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        encoded = [str(s).encode() for s in array.ravel()]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    little_endian = {"FP32": "<f4", "INT64": "<i8"}[datatype]
    return np.ascontiguousarray(array, dtype=little_endian).tobytes()
