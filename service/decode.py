"""Request bytes → the uint8 (S, S, 3) RGB array the runner takes, with clear errors.

Two steps, timed separately by the caller: ``decode`` (bytes → a loaded Pillow image: first frame
of an animation, EXIF orientation applied, pixel limit enforced) and ``prepare`` (any mode → RGB
→ shorter side to S, centre crop), which uses the very functions training uses
(``service.preprocess``), so the model sees pixels prepared the same way in both places.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidImage, LimitExceeded
from service.preprocess import resize_center_crop, to_rgb

logger = logging.getLogger(__name__)

# Formats a client may send. Others (EPS runs Ghostscript, for one) are refused on purpose.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


def open_image(data: bytes, *, max_pixels: int, max_side: int | None = None,
               name: str = "image") -> Image.Image:
    """Parse ``data``'s header and enforce the limits; no pixel is decompressed yet.

    The pixel and side-length limits are checked on the header's size. Pillow's own process-wide
    guard (``Image.MAX_IMAGE_PIXELS``, raised by the app to at least ``max_pixels``) stays in place
    behind them and refuses a header claiming more than twice its value inside ``Image.open``
    already; that is answered with the same limit. Cheap (~25 µs), so the request path calls it on
    the event loop and decides from the size whether the decoding itself goes to a worker thread.
    """
    if not data:
        raise InvalidImage(f"{name} is empty: send the bytes of a JPEG, PNG, ... image")
    with _decoder_errors(name, max_pixels):
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise LimitExceeded(
                f"{name} is {width}x{height} = {width * height} pixels, more than the limit of "
                f"{max_pixels} (CPCNN_MAX_IMAGE_PIXELS): send a smaller image", code="image_too_large"
            )
        if max_side is not None and max(width, height) > max_side:
            raise LimitExceeded(
                f"{name} is {width}x{height}; its longer side is more than the limit of {max_side} "
                "pixels (CPCNN_MAX_IMAGE_SIDE): send a smaller image", code="image_too_large")
    return img


def load_image(img: Image.Image, *, max_pixels: int, name: str = "image") -> Image.Image:
    """Decompress an ``open_image`` result (frame 0 of an animation), EXIF orientation applied."""
    with _decoder_errors(name, max_pixels):
        img.seek(0)  # animated GIF/PNG/WebP/TIFF: the first frame
        img.load()
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        logger.debug("ignoring unreadable EXIF orientation of %s", name, exc_info=True)
        return img


def decode(data: bytes, *, max_pixels: int, max_side: int | None = None,
           name: str = "image") -> Image.Image:
    """Decode ``data`` fully, or raise ``InvalidImage``/``LimitExceeded`` saying what is wrong."""
    return load_image(open_image(data, max_pixels=max_pixels, max_side=max_side, name=name),
                      max_pixels=max_pixels, name=name)


@contextlib.contextmanager
def _decoder_errors(name: str, max_pixels: int) -> Iterator[None]:
    """Any failure of the decoder on untrusted bytes → the input's fault, said plainly."""
    try:
        yield
    except Image.DecompressionBombError as e:
        logger.debug("Pillow refused %s: %s", name, e)
        raise LimitExceeded(
            f"{name} declares more pixels than the limit of {max_pixels} "
            "(CPCNN_MAX_IMAGE_PIXELS): send a smaller image", code="image_too_large") from e
    except UnidentifiedImageError as e:
        raise InvalidImage(
            f"{name} is not an image in a supported format ({', '.join(FORMATS)})"
        ) from e
    except (LimitExceeded, MemoryError):
        raise
    except Exception as e:  # untrusted bytes: any decoder failure is the input's fault
        logger.debug("decoding %s failed", name, exc_info=True)
        raise InvalidImage(f"{name} is truncated or corrupt and could not be decoded ({e})") from e


# A strip more elongated than this (e.g. 10000 x 1) is not scaled whole before the crop: only the
# kept square is resampled, so the work stays bounded by the output size (preprocess.py).
MAX_ASPECT_SCALED_WHOLE = 16


def prepare(img: Image.Image, size: int) -> np.ndarray:
    """Any Pillow mode → RGB → resize + centre crop → (size, size, 3) uint8."""
    try:
        rgb = resize_center_crop(to_rgb(img), size,
                                 max_resized_pixels=MAX_ASPECT_SCALED_WHOLE * size * size)
        arr = np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise InvalidImage(f"image could not be converted to RGB ({e})") from e
    if arr.shape != (size, size, 3):  # defensive: to_rgb guarantees RGB
        raise InvalidImage(f"image could not be converted to {size}x{size} RGB (got {arr.shape})")
    return arr
