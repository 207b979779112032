"""Request bytes → the uint8 (S, S, 3) RGB array the runner takes, with clear errors.

Two steps, timed separately: ``decode`` (bytes → a loaded Pillow image: first frame of an
animation, EXIF orientation applied) and ``prepare`` (any mode → RGB → shorter side to S, centre
crop), which uses the very functions training uses (``modelpack.preprocess``), so the model sees
pixels prepared the same way in both places.

Untrusted bytes are decoded inside a budget (``DecodeLimits``): declared sizes are checked from the
header before a pixel is allocated (per image and summed over the request); Pillow's own guards
stay on (``Image.MAX_IMAGE_PIXELS``, PNG text-chunk limits); where it has none this module adds
its own — at most ``MAX_HEADER_READS`` reads to parse a header (metadata chunk and segment
counts), ``MAX_JPEG_SCANS`` progressive scans, ``MAX_TILES`` strips or tiles; and a deadline
checked between the decoder's reads of ``DECODE_BLOCK_BYTES``. JPEGs are decoded at the smallest
DCT scale that still leaves twice the model's input side (``Image.draft``), so a 40 MP photo
costs a 64th of its full-size memory. A request that declared many pixels hands the freed memory
back to the OS (``release_freed_memory``).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from modelpack.preprocess import resize_center_crop, to_rgb
from service.errors import InvalidImage, LimitExceeded

logger = logging.getLogger(__name__)

# Formats a client may send. Others (EPS runs Ghostscript, for one) are refused on purpose.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")

# Safety bounds no ordinary image comes near (not settings: nobody needs to raise them).
# Parsing a header (PNG chunks before the pixels, JPEG segments, GIF comment blocks, TIFF tags)
# takes a few reads per item; ordinary files need well under 100 reads.
MAX_HEADER_READS = 4096
# Encoders write 1 (baseline) to ~10-20 (progressive) scans; each scan costs a pass over the
# image's coefficients, so thousands of them are minutes of CPU in a few kilobytes.
MAX_JPEG_SCANS = 100
# A TIFF with one strip per row of a 16384-row image has 16384 strips.
MAX_TILES = 65536
# The decoder is fed this much at a time; the deadline is checked between feeds.
DECODE_BLOCK_BYTES = 16 * 1024
# After a request whose images declared more pixels than this, freed memory goes back to the OS.
TRIM_AFTER_PIXELS = 4_000_000


@dataclass(frozen=True)
class DecodeLimits:
    """What one request may make the server decode (from the service settings)."""

    max_pixels: int  # one image, width x height
    max_side: int | None  # one image's longer side
    max_request_pixels: int  # all of a request's images together
    budget_s: float  # seconds of decoding for the whole request


class DecodeBudget:
    """One request's decode deadline on the monotonic clock, checked between decoder reads."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def check(self, name: str) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(
                f"decoding the request's images took longer than its budget of {self.seconds:g} s "
                f"(CPCNN_DECODE_BUDGET_S; stopped at {name}): send smaller or simpler images",
                code="decode_budget_exceeded")


class _MeteredBytes(io.BytesIO):
    """The image's bytes as Pillow reads them: each read checks the budget and, while the header
    is parsed, counts against ``MAX_HEADER_READS``."""

    def __init__(self, data: bytes, budget: DecodeBudget | None, name: str) -> None:
        super().__init__(data)
        self.budget, self.name = budget, name
        self.header_reads: int | None = 0  # None once the header is parsed

    def read(self, size: int | None = -1) -> bytes:
        if self.header_reads is not None:
            self.header_reads += 1
            if self.header_reads > MAX_HEADER_READS:
                raise LimitExceeded(
                    f"{self.name} has more metadata chunks or segments than an image needs "
                    f"(over {MAX_HEADER_READS} reads before its pixels): send the image without "
                    "them", code="image_too_complex")
        if self.budget is not None:
            self.budget.check(self.name)
        return super().read(size)


def open_image(data: bytes, *, max_pixels: int, max_side: int | None = None,
               name: str = "image", budget: DecodeBudget | None = None) -> Image.Image:
    """Parse ``data``'s header and enforce the limits; no pixel is decompressed yet.

    The pixel and side-length limits are checked on the header's size. Pillow's own process-wide
    guard (``Image.MAX_IMAGE_PIXELS``, raised by the app to at least ``max_pixels``) stays in place
    behind them and refuses a header claiming more than twice its value inside ``Image.open``
    already; that is answered with the same limit. The header's reads are counted
    (``MAX_HEADER_READS``), a JPEG's scans and a TIFF's strips too.
    """
    if not data:
        raise InvalidImage(f"{name} is empty: send the bytes of a JPEG, PNG, ... image")
    with _decoder_errors(name, max_pixels):
        fp = _MeteredBytes(data, budget, name)
        img = Image.open(fp, formats=FORMATS)
        fp.header_reads = None
        img.decodermaxblock = DECODE_BLOCK_BYTES
        _check_structure(img, data, name)
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


def _check_structure(img: Image.Image, data: bytes, name: str) -> None:
    """Refuse what no ordinary image has: thousands of JPEG scans, of TIFF strips or tiles."""
    if img.format == "JPEG":
        # 0xFFDA (start of scan) only occurs as a marker: entropy-coded 0xFF bytes are stuffed.
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise LimitExceeded(f"{name} is a JPEG of {scans} scans, more than the {MAX_JPEG_SCANS} "
                                "any encoder writes: re-encode it", code="image_too_complex")
    if len(img.tile) > MAX_TILES:
        raise LimitExceeded(f"{name} is stored in {len(img.tile)} strips or tiles, more than "
                            f"{MAX_TILES}: re-encode it", code="image_too_complex")


def load_image(img: Image.Image, *, max_pixels: int, name: str = "image",
               min_side: int | None = None) -> Image.Image:
    """Decompress an ``open_image`` result (frame 0 of an animation), EXIF orientation applied.

    ``min_side``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side
    is still at least this (``Image.draft``), which saves memory and time on large photos.
    """
    with _decoder_errors(name, max_pixels):
        img.seek(0)  # animated GIF/PNG/WebP/TIFF: the first frame
        if min_side is not None and img.format == "JPEG":
            img.draft(None, (min_side, min_side))
        img.load()
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no second copy of a large image
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        logger.debug("ignoring unreadable EXIF orientation of %s", name, exc_info=True)
    return img


def decode(data: bytes, *, max_pixels: int, max_side: int | None = None,
           name: str = "image") -> Image.Image:
    """Decode ``data`` fully, or raise ``InvalidImage``/``LimitExceeded`` saying what is wrong."""
    return load_image(open_image(data, max_pixels=max_pixels, max_side=max_side, name=name),
                      max_pixels=max_pixels, name=name)


def open_request(datas: Sequence[bytes], names: Sequence[str], limits: DecodeLimits,
                 budget: DecodeBudget | None = None) -> list[Image.Image]:
    """Every image's header parsed and checked, and the pixels they declare together bounded."""
    opened = [open_image(data, max_pixels=limits.max_pixels, max_side=limits.max_side, name=name,
                         budget=budget) for data, name in zip(datas, names, strict=True)]
    pixels = sum(img.width * img.height for img in opened)
    if pixels > limits.max_request_pixels:
        for img in opened:
            img.close()
        raise LimitExceeded(
            f"the request's {len(opened)} images declare {pixels} pixels in all, more than "
            f"{limits.max_request_pixels} (CPCNN_MAX_REQUEST_PIXELS): send fewer or smaller images",
            code="request_too_large")
    return opened


def decode_request(datas: Sequence[bytes], names: Sequence[str], limits: DecodeLimits, size: int,
                   opened: list[Image.Image] | None = None, header_seconds: float = 0.0,
                   reserve: Callable[[int], AbstractContextManager[None]] | None = None,
                   ) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A request's images → (N, size, size, 3) uint8 and per-image (decode, preprocess) seconds.

    Opens them first unless ``opened`` (headers already parsed, ``header_seconds`` each) is given.
    ``reserve(pixels)`` holds the declared pixels while they are decoded (admission control; it
    raises to refuse). Each decoded image is freed as soon as it is prepared, and all of them on
    failure; after a request that declared more than ``TRIM_AFTER_PIXELS`` the freed memory
    returns to the OS.
    """
    budget = DecodeBudget(limits.budget_s)
    if opened is None:
        t0 = time.perf_counter()
        opened = open_request(datas, names, limits, budget)
        header_seconds = (time.perf_counter() - t0) / len(opened)
    declared = sum(img.width * img.height for img in opened)
    arrays, timings = [], []
    try:
        with reserve(declared) if reserve is not None else contextlib.nullcontext():
            for img, name in zip(opened, names, strict=True):
                t0 = time.perf_counter()
                pil = load_image(img, max_pixels=limits.max_pixels, name=name, min_side=2 * size)
                t1 = time.perf_counter()
                try:
                    arrays.append(prepare(pil, size))
                finally:
                    img.close()
                timings.append((header_seconds + t1 - t0, time.perf_counter() - t1))
    finally:
        for img in opened:
            img.close()  # frees the pixels even while an exception's traceback still holds img
        if declared > TRIM_AFTER_PIXELS:
            release_freed_memory()
    return np.stack(arrays), timings


def release_freed_memory() -> None:
    """Return memory freed to the C allocator to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks in its arenas (one per thread that allocated), so without this a
    process's RSS stays at its largest request's peak."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


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
