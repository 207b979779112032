"""Reading images out of a ``/classify`` request body, with the body-size and file-count limits.

Two shapes are accepted: ``multipart/form-data`` with a repeatable file field ``file``, or one raw
image body with ``Content-Type: image/*`` (``application/octet-stream`` is accepted too, for
``curl --data-binary``). The body is counted while it streams in, so a huge upload is refused at
the limit instead of being buffered first.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from service.errors import (
    ClientClosed,
    InvalidRequest,
    LimitExceeded,
    RequestTimeout,
    UnsupportedMediaType,
)
from service.intake import ImageInput

FILE_FIELD = "file"
HOW_TO_SEND = ("send images as multipart/form-data field 'file' (curl -F file=@img.jpg, repeat for "
               "several) or one raw image body with Content-Type: image/jpeg, image/png, ...")


def body_too_large(limit: int) -> LimitExceeded:
    return LimitExceeded(
        f"request body is larger than the limit of {limit} bytes (CPCNN_MAX_BODY_BYTES): send "
        "fewer or smaller images per request", code="body_too_large")


async def limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused past ``limit`` bytes (413). Read it inside ``body_deadline``."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        yield chunk


@contextlib.asynccontextmanager
async def body_deadline(timeout_s: float) -> AsyncIterator[None]:
    """The body must have arrived within ``timeout_s`` seconds (408), and a client that
    disconnects mid-body is ``ClientClosed``, not a server error. One deadline for the whole
    read, not one per chunk (each cancel scope costs the hot path; bench/README.md, "Cores")."""
    try:
        with anyio.fail_after(timeout_s):
            yield
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s (CPCNN_BODY_TIMEOUT_S): "
            "send it at once, or smaller") from None
    except ClientDisconnect:
        raise ClientClosed("the client disconnected before its request body was read") from None


MAX_LENGTH_DIGITS = 18  # a byte count with more digits than this is no real body


def parse_length(text: str, what: str) -> int:
    """A byte count from a header: ASCII digits only, at most ``MAX_LENGTH_DIGITS`` of them.

    ``str.isdigit`` accepts digits such as '¹²³' that ``int`` refuses, and ``int`` refuses more
    than 4,300 digits: either way an ``InvalidRequest`` (400), never an exception that is a 500.
    """
    t = text.strip()
    if not t or len(t) > MAX_LENGTH_DIGITS or not (t.isascii() and t.isdigit()):
        shown = t if len(t) <= 40 else t[:40] + "…"
        raise InvalidRequest(f"{what} must be a byte count of at most {MAX_LENGTH_DIGITS} ASCII "
                             f"digits, got {shown!r}", code="bad_length")
    return int(t)


def check_declared_length(request: Request, limit: int) -> int | None:
    """The request's ``Content-Length`` (None without one); 400 if malformed, 413 over ``limit``."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    length = parse_length(declared, "Content-Length")
    if length > limit:
        raise body_too_large(limit)
    return length


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout_s`` (V2 and admin bodies; /classify
    streams its multipart parts instead)."""
    check_declared_length(request, limit)
    return await _read_stream(request, limit, timeout_s)


async def _read_stream(request: Request, limit: int, timeout_s: float) -> bytes:
    async with body_deadline(timeout_s):
        return b"".join([chunk async for chunk in limited_stream(request, limit)])


async def read_images(request: Request, *, max_body_bytes: int, max_files: int,
                      body_timeout_s: float) -> list[ImageInput]:
    """The request's images, or a ``ServiceError`` saying what is wrong with the body."""
    declared_length = check_declared_length(request, max_body_bytes)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await _read_multipart(request, max_body_bytes, max_files, body_timeout_s)
    if media.startswith("image/") or media == "application/octet-stream":
        body = await _read_stream(request, max_body_bytes, body_timeout_s)
        if not body:
            raise InvalidRequest(f"the request body is empty: {HOW_TO_SEND}", code="empty_body")
        return [ImageInput(body, filename=None, name="the request body")]
    if not media:
        if not declared_length:
            raise InvalidRequest(f"the request has no body: {HOW_TO_SEND}", code="empty_body")
        raise UnsupportedMediaType(f"the request has no Content-Type: {HOW_TO_SEND}")
    raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted: {HOW_TO_SEND}")


async def _read_multipart(request: Request, limit: int, max_files: int,
                          timeout_s: float) -> list[ImageInput]:
    parser = MultiPartParser(request.headers, limited_stream(request, limit),
                             max_files=max_files, max_fields=16)
    try:
        async with body_deadline(timeout_s):
            form = await parser.parse()
    except MultiPartException as e:
        if str(e).startswith("Too many files"):
            raise LimitExceeded(
                f"more than {max_files} files in one request (CPCNN_MAX_FILES): split them over "
                "several requests", code="too_many_files") from e
        raise InvalidRequest(f"malformed multipart body ({e}): {HOW_TO_SEND}",
                             code="invalid_multipart") from e
    try:
        unexpected = sorted({key for key in form if key != FILE_FIELD})
        if unexpected:
            raise InvalidRequest(
                f"unexpected multipart field(s) {unexpected}: images go in field 'file'; "
                "top_k, tau and mode go in the query string (?top_k=5&tau=0.7)",
                code="unexpected_field")
        parts = form.getlist(FILE_FIELD)
        if not parts:
            raise InvalidRequest(f"no 'file' part in the multipart body: {HOW_TO_SEND}",
                                 code="missing_file")
        images = []
        for i, part in enumerate(parts, start=1):
            if not isinstance(part, UploadFile):
                raise InvalidRequest(
                    f"multipart part {i} named 'file' is a text field, not a file upload: "
                    "give it a filename (curl -F file=@img.jpg)", code="missing_file")
            images.append(ImageInput(await part.read(), filename=part.filename,
                                     name=f"file {i} ({part.filename!r})"))
        return images
    finally:
        await form.close()
