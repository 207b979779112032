"""From what a request sent to a batch preparation: where its images decode, and how.

Bytes (``/classify`` uploads, V2 ``BYTES``) or decoded pixels (V2 ``UINT8``) become a
``Preparation``: a function that returns the (N, size, size, 3) uint8 batch with per-image
(decode, preprocess) seconds, and whether it is cheap enough to run on the event loop. The
scheduler (``service.runtime``) decides nothing about decoding beyond running it there or in a
worker thread as this says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from service.decode import DecodeLimits, decode_request, open_request, prepare
from service.errors import InvalidImage, InvalidParameter, LimitExceeded

# A request body of at most this many bytes has its image headers parsed on the event loop
# (bounded work: parsing cost grows with the bytes); larger ones are opened in a worker thread.
INLINE_OPEN_MAX_BYTES = 64 * 1024
# Requests whose images add up to at most this many pixels (by their headers) are decoded and
# prepared on the event loop (bench/README.md: less than the hop to a worker thread and back).
# Larger ones go to a worker thread (Pillow releases the GIL while decoding), so one big image
# never stalls the loop.
INLINE_PREPARE_MAX_PIXELS = 128 * 128

Prepare = Callable[[int], tuple[np.ndarray, list[tuple[float, float]]]]


@dataclass(frozen=True)
class ImageInput:
    """One image as it arrived: its bytes and, for multipart uploads, its file name."""

    data: bytes
    filename: str | None = None
    name: str = "image"  # how error messages refer to it ("file 2 ('cat.png')")



@dataclass(frozen=True)
class Preparation:
    """``prepare(size)``: the batch and per-image (decode, preprocess) seconds; ``inline``: cheap
    enough for the event loop; ``filenames``: per image, for the response."""

    prepare: Prepare
    filenames: list[str | None]
    inline: bool


def from_bytes(images: Sequence[ImageInput], limits: DecodeLimits,
               reserve: Callable[[int], AbstractContextManager[None]]) -> Preparation:
    """Encoded images: small bodies have their headers read here, and their pixels decide where
    they decode; a large body is opened in the worker thread too."""
    if not images:
        raise InvalidParameter("no images to classify")
    datas, names = [img.data for img in images], [img.name for img in images]
    filenames = [img.filename for img in images]
    if sum(len(data) for data in datas) > INLINE_OPEN_MAX_BYTES:
        return Preparation(partial(decode_request, datas, names, limits, reserve=reserve),
                           filenames, inline=False)
    t0 = time.perf_counter()
    opened = open_request(datas, names, limits)
    run = partial(decode_request, datas, names, limits, opened=opened,
                  header_seconds=(time.perf_counter() - t0) / len(opened), reserve=reserve)
    pixels = sum(img.width * img.height for img in opened)
    return Preparation(run, filenames, inline=pixels <= INLINE_PREPARE_MAX_PIXELS)


def from_pixels(pixels: np.ndarray, limits: DecodeLimits) -> Preparation:
    """Decoded (N, H, W, 3) uint8 RGB images within the per-image limits; images of another size
    than the model's are prepared (shorter side resized, centre crop) like decoded uploads."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or not pixels.size:
        raise InvalidImage(f"pixels must be a non-empty (N, H, W, 3) uint8 RGB array, got "
                           f"shape {list(pixels.shape)} of {pixels.dtype}")
    _, height, width, _ = pixels.shape
    if height * width > limits.max_pixels:
        raise LimitExceeded(
            f"{height}x{width} images are more pixels than the limit of {limits.max_pixels} "
            "(CPCNN_MAX_IMAGE_PIXELS): send smaller images", code="image_too_large")
    if limits.max_side is not None and max(height, width) > limits.max_side:
        raise LimitExceeded(
            f"{height}x{width} images have a side longer than the limit of {limits.max_side} "
            "pixels (CPCNN_MAX_IMAGE_SIDE): send smaller images", code="image_too_large")
    return Preparation(partial(_prepare_pixels, pixels), [None] * len(pixels),
                       inline=pixels[..., 0].size <= INLINE_PREPARE_MAX_PIXELS)


def _prepare_pixels(pixels: np.ndarray, size: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Decoded (N, H, W, 3) uint8 → (N, size, size, 3), resized like uploads when H, W differ."""
    if pixels.shape[1:3] == (size, size):
        return np.ascontiguousarray(pixels), [(0.0, 0.0)] * len(pixels)
    arrays, timings = [], []
    for image in pixels:  # (H, W, 3)
        t0 = time.perf_counter()
        arrays.append(prepare(Image.fromarray(image), size))
        timings.append((0.0, time.perf_counter() - t0))
    return np.stack(arrays), timings  # (N, size, size, 3)
