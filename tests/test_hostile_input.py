"""The hostile and odd input corpus: every kind of request `/classify` may be sent, one table.

Each row builds one request (generated here, nothing downloaded) and names the defined answer: a
result (200) or a 4xx JSON error with its code, and for a refused limit the limit's variable and
value in the message. Whatever the row, the server never answers 5xx. ``CORPUS`` is the single
place the corpus lives; tests of exact conversions (16-bit = 8-bit, alpha on white, ...) that need
two requests are in ``test_service_input.py``.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, features
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.settings import Settings
from tests.conftest import SHIPPED_PACKAGE

# The app under test runs with small limits, so the corpus stays small and fast.
MAX_BODY = 300_000
MAX_FILES = 3
MAX_PIXELS = 1_000_000
MAX_SIDE = 4096
ALL = "?top_k=1000"  # every class, so the scores of a result sum to 1


# -- request and image builders ----------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    content: bytes | Callable[[], Iterable[bytes]] | None = None
    files: list | None = None
    data: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    query: str = ALL

    def send(self, client: TestClient):
        content = self.content() if callable(self.content) else self.content
        return client.post(f"/classify{self.query}", content=content, files=self.files,
                           data=self.data, headers=self.headers)


def raw(data: bytes, content_type: str | None = "image/png", query: str = ALL) -> Req:
    return Req(content=data, headers={"Content-Type": content_type} if content_type else {},
               query=query)


def multipart(*blobs: bytes, names: list[str] | None = None, query: str = ALL) -> Req:
    names = names or [f"f{i}.img" for i in range(len(blobs))]
    return Req(files=[("file", (n, b, "application/octet-stream"))
                      for n, b in zip(names, blobs, strict=True)], query=query)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(size: tuple[int, int] = (48, 40)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 90, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def noise(size: tuple[int, int] = (120, 100)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def half(data: bytes) -> bytes:
    return data[:len(data) // 2]


def png() -> bytes:
    return encode(gradient())


def jpeg() -> bytes:
    return encode(gradient((200, 160)), "JPEG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunk(kind: bytes, data: bytes) -> bytes:
    """A valid small PNG with one more chunk placed right after IHDR."""
    base = png()
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return base[:ihdr_end] + png_chunk(kind, data) + base[ihdr_end:]


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (8-bit RGB), with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is rewritten to claim ``width`` x ``height``."""
    data = bytearray(encode(gradient((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(gradient((16, 16)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(data)


def corrupt_png_crc() -> bytes:
    data = bytearray(png())
    data[60] ^= 0xFF  # inside the IDAT chunk
    return bytes(data)


def corrupt_jpeg_header() -> bytes:
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 2:sof + 40] = b"\x13" * 38  # garbage over the frame header and what follows
    return bytes(data)


def zip_file() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("cat.png", png())
    return buf.getvalue()


def sixteen_bit_png() -> bytes:
    wide = np.asarray(gradient().convert("L"), dtype=np.uint16) * 257
    img = Image.fromarray(wide)  # uint16 -> mode I;16
    data = encode(img)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    return data


def palette_with_transparency() -> bytes:
    p = gradient().convert("P")
    data = encode(p, transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    return data


def animated_gif(frames: int = 3) -> bytes:
    images = [Image.new("RGB", (40, 40), ((60 * i) % 256, 20, 250 - (7 * i) % 200))
              for i in range(frames)]
    data = encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == frames
    return data


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = Image.new("RGB", (64, 32), (230, 30, 30))
    img.paste((30, 30, 230), (32, 0, 64, 32))  # left red, right blue: rotation changes the crop
    return encode(img, "JPEG", exif=exif, quality=95)


def ppm_16bit() -> bytes:
    pixels = (np.arange(20 * 30 * 3, dtype=">u2").reshape(20, 30, 3) * 97) % 65535
    return b"P6\n30 20\n65535\n" + pixels.astype(">u2").tobytes()


def png_with_many_chunks(count: int) -> bytes:
    """A valid small PNG with ``count`` empty tEXt chunks before its pixels (the attack: 400k)."""
    base = png()
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return base[:ihdr_end] + png_chunk(b"tEXt", b"k\0") * count + base[ihdr_end:]


def jpeg_with_repeated_scans(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: each scan is a pass over every coefficient
    (the attack: 2,000 scans of a 6000x6000 image, 12 s of CPU in 259 KB)."""
    data = encode(gradient((64, 64)), "JPEG", progressive=True)
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * scans + data[end:]


def jpeg_with_app_segments(count: int, size: int = 60_000) -> bytes:
    """A JPEG with ``count`` APP15 segments of ``size`` bytes (each at most 64 KB by the format)."""
    data = jpeg()
    segment = b"\xff\xef" + struct.pack(">H", size + 2) + b"\x00" * size
    return data[:2] + segment * count + data[2:]


def gif_with_comment_blocks(blocks: int) -> bytes:
    """A GIF whose comment is ``blocks`` one-byte sub-blocks (the attack: a 1.5 MB comment)."""
    data = encode(gradient((16, 16)), "GIF")
    flags = data[10]
    table = 3 << ((flags & 7) + 1) if flags & 0x80 else 0
    at = 13 + table
    return data[:at] + b"\x21\xfe" + b"\x01x" * blocks + b"\x00" + data[at:]


def text_field_named_file() -> Req:
    return Req(files=[("file", (None, b"just text"))])


def multipart_raw(body: bytes, boundary: str | None = "xyz") -> Req:
    ct = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    return Req(content=body, headers={"Content-Type": ct})


def streamed_over_limit() -> Req:
    def chunks():  # no Content-Length: the body is counted while it streams in
        for _ in range(10):
            yield b"\0" * (MAX_BODY // 5)
    return Req(content=chunks, headers={"Content-Type": "image/png"})


# -- what a row expects ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    request: Callable[[], Req]
    status: int
    code: str | None = None  # error code (4xx rows)
    says: tuple[str, ...] = ()  # the message names these (a limit's variable and value, ...)
    images: int = 1  # results expected (200 rows)
    check: Callable[[TestClient, dict], None] | None = None  # more about a 200 answer
    marks: tuple = ()


def _scores(body: dict, i: int = 0) -> dict[int, float]:
    return {p["index"]: p["score"] for p in body["results"][i]["predictions"]}


def _exif_rotation_applied(client: TestClient, body: dict) -> None:
    stored = Image.open(io.BytesIO(exif_jpeg(6)))  # pixels as stored, orientation not applied
    assert stored.size == (64, 32)
    upright = encode(stored.transpose(Image.Transpose.ROTATE_270))  # orientation 6, by hand
    unrotated = encode(stored)
    want = _scores(client.post(f"/classify{ALL}", content=upright,
                               headers={"Content-Type": "image/png"}).json())
    ignored = _scores(client.post(f"/classify{ALL}", content=unrotated,
                                  headers={"Content-Type": "image/png"}).json())
    assert _scores(body) == pytest.approx(want, abs=1e-6)
    assert _scores(body) != pytest.approx(ignored, abs=1e-6)


def _top_k_clamped(client: TestClient, body: dict) -> None:
    n = len(client.get("/v1/model").json()["classes"])
    assert body["top_k"] == n and len(body["results"][0]["predictions"]) == n


def _filename_echoed(client: TestClient, body: dict) -> None:
    assert [r["filename"] for r in body["results"]] == ["../../etc/passwd", "ünï cødé.png"]


LIMIT_PIXELS = ("CPCNN_MAX_IMAGE_PIXELS", str(MAX_PIXELS))
LIMIT_SIDE = ("CPCNN_MAX_IMAGE_SIDE", str(MAX_SIDE))
LIMIT_BODY = ("CPCNN_MAX_BODY_BYTES", str(MAX_BODY))
LIMIT_FILES = ("CPCNN_MAX_FILES", str(MAX_FILES))
WEBP = pytest.mark.skipif(not features.check("webp"), reason="this Pillow has no WebP support")

CORPUS: list[Case] = [
    # -- not an image at all ----------------------------------------------------------------
    Case("zero-bytes-raw", lambda: raw(b""), 400, "empty_body"),
    Case("no-body", lambda: Req(), 400, "empty_body"),
    Case("zero-byte-file-part", lambda: multipart(b""), 400, "invalid_image", ("file 1",)),
    Case("text", lambda: raw(b"this is not an image at all"), 400, "invalid_image"),
    Case("html", lambda: multipart(b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)>"),
         400, "invalid_image"),
    Case("svg-xml", lambda: raw(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" '
                                b'width="10" height="10"><rect width="10" height="10"/></svg>',
                                "image/svg+xml"), 400, "invalid_image"),
    Case("zip", lambda: raw(zip_file(), "application/octet-stream"), 400, "invalid_image"),
    Case("pdf", lambda: raw(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"), 400,
         "invalid_image"),
    Case("gzip-encoded-png", lambda: Req(content=gzip.compress(png()), headers={
        "Content-Type": "image/png", "Content-Encoding": "gzip"}), 400, "invalid_image"),
    Case("polyglot-gif-magic", lambda: raw(b"GIF89a but not really"), 400, "invalid_image"),
    Case("second-file-bad", lambda: multipart(png(), b"GIF89a but not really"), 400,
         "invalid_image", ("file 2",)),
    # -- formats refused on purpose (some Pillow plugins run external programs) ---------------
    Case("eps-postscript", lambda: raw(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
                                       b"showpage\n", "application/postscript"), 415,
         "unsupported_media_type"),
    Case("eps-as-octet-stream", lambda: raw(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
                                            b"showpage\n", "application/octet-stream"), 400,
         "invalid_image"),
    Case("ico", lambda: raw(encode(gradient((32, 32)), "ICO"), "image/x-icon"), 400,
         "invalid_image"),
    # -- broken images ----------------------------------------------------------------------
    Case("truncated-jpeg", lambda: raw(half(encode(noise(), "JPEG")), "image/jpeg"), 400,
         "invalid_image"),
    Case("truncated-png", lambda: raw(half(encode(noise()))), 400, "invalid_image"),
    Case("truncated-gif", lambda: raw(half(encode(noise(), "GIF")), "image/gif"), 400,
         "invalid_image"),
    Case("truncated-webp", lambda: raw(half(encode(noise(), "WEBP")), "image/webp"), 400,
         "invalid_image", marks=(WEBP,)),
    Case("png-signature-and-ihdr-only", lambda: raw(png()[:40]), 400, "invalid_image"),
    Case("png-bad-crc", lambda: raw(corrupt_png_crc()), 400, "invalid_image"),
    Case("jpeg-corrupt-header", lambda: raw(corrupt_jpeg_header(), "image/jpeg"), 400,
         "invalid_image"),
    Case("png-zero-width", lambda: raw(png_header_claiming(0, 10)), 400, "invalid_image"),
    Case("png-itxt-zlib-bomb", lambda: raw(png_with_chunk(
        b"iTXt", b"Comment\0\x01\0\0\0" + zlib.compress(b"A" * 50_000_000, 9))), 400,
         "invalid_image"),
    # -- limits -----------------------------------------------------------------------------
    Case("pixel-bomb-header-100000x100000", lambda: raw(png_header_claiming(100_000, 100_000)),
         413, "image_too_large", LIMIT_PIXELS),
    Case("pixel-bomb-header-3000x3000", lambda: raw(png_header_claiming(3000, 3000)), 413,
         "image_too_large", (*LIMIT_PIXELS, "3000x3000")),
    Case("pixel-bomb-real-zeros", lambda: raw(encode(Image.new("L", (2000, 1000)))), 413,
         "image_too_large", LIMIT_PIXELS),
    Case("jpeg-header-claiming-65000x65000", lambda: raw(jpeg_claiming(65000, 65000),
                                                         "image/jpeg"), 413, "image_too_large",
         LIMIT_PIXELS),
    Case("gif-screen-65535x65535", lambda: raw(gif_claiming(65535, 65535), "image/gif"), 413,
         "image_too_large", LIMIT_PIXELS),
    Case("strip-10000x1", lambda: raw(encode(Image.new("RGB", (10000, 1), (9, 99, 199)))), 413,
         "image_too_large", (*LIMIT_SIDE, "10000x1")),
    Case("body-over-limit", lambda: raw(b"\x89PNG" + b"\0" * MAX_BODY), 413, "body_too_large",
         LIMIT_BODY),
    Case("body-over-limit-streamed", streamed_over_limit, 413, "body_too_large", LIMIT_BODY),
    Case("multipart-over-limit", lambda: multipart(b"\x89PNG" + b"\0" * MAX_BODY), 413,
         "body_too_large", LIMIT_BODY),
    Case("files-one-over-limit", lambda: multipart(*[png()] * (MAX_FILES + 1)), 413,
         "too_many_files", LIMIT_FILES),
    Case("files-far-over-limit", lambda: multipart(*[b"x"] * 200), 413, "too_many_files",
         LIMIT_FILES),
    # -- odd but valid images: classified ---------------------------------------------------
    Case("1x1", lambda: raw(encode(Image.new("RGB", (1, 1), (200, 10, 10)))), 200),
    Case("strip-1x4000", lambda: raw(encode(Image.new("RGB", (1, 4000), (9, 99, 199)))), 200),
    Case("files-at-limit", lambda: multipart(*[encode(gradient((8, 8)))] * MAX_FILES), 200,
         images=MAX_FILES),
    Case("cmyk-jpeg", lambda: raw(encode(gradient().convert("CMYK"), "JPEG"), "image/jpeg"), 200),
    Case("png-16-bit", lambda: raw(sixteen_bit_png()), 200),
    Case("ppm-16-bit", lambda: raw(ppm_16bit(), "image/x-portable-pixmap"), 200),
    Case("tiff-32-bit-int", lambda: raw(encode(gradient().convert("I"), "TIFF"), "image/tiff"),
         200),
    Case("tiff-float", lambda: raw(encode(gradient().convert("F"), "TIFF"), "image/tiff"), 200),
    Case("palette-with-transparency", lambda: raw(palette_with_transparency()), 200),
    Case("palette", lambda: raw(encode(gradient().convert("P"))), 200),
    Case("grey-L", lambda: raw(encode(gradient().convert("L"))), 200),
    Case("grey-alpha-LA", lambda: raw(encode(gradient().convert("LA"))), 200),
    Case("rgba", lambda: raw(encode(gradient().convert("RGBA"))), 200),
    Case("one-bit", lambda: raw(encode(gradient().convert("1"))), 200),
    Case("animated-gif", lambda: raw(animated_gif(), "image/gif"), 200),
    Case("animated-gif-many-frames", lambda: raw(animated_gif(60), "image/gif"), 200),
    Case("exif-rotated-jpeg", lambda: raw(exif_jpeg(6), "image/jpeg"), 200,
         check=_exif_rotation_applied),
    Case("exif-invalid-orientation", lambda: raw(exif_jpeg(9), "image/jpeg"), 200),
    Case("webp", lambda: raw(encode(gradient(), "WEBP"), "image/webp"), 200, marks=(WEBP,)),
    Case("bmp", lambda: raw(encode(gradient(), "BMP"), "image/bmp"), 200),
    Case("tiff", lambda: raw(encode(gradient(), "TIFF"), "image/tiff"), 200),
    Case("png-big-uncompressed-itxt", lambda: raw(png_with_chunk(
        b"iTXt", b"Comment\0\0\0\0\0" + b"A" * 200_000)), 200),
    # -- metadata and structure no ordinary image has (each one cheap to refuse) ------------
    Case("png-5000-text-chunks", lambda: raw(png_with_many_chunks(5000)), 413,
         "image_too_complex", ("metadata",)),
    Case("png-50-text-chunks", lambda: raw(png_with_many_chunks(50)), 200),
    Case("jpeg-150-scans", lambda: raw(jpeg_with_repeated_scans(150), "image/jpeg"), 413,
         "image_too_complex", ("scans",)),
    Case("jpeg-progressive", lambda: raw(encode(gradient((64, 64)), "JPEG", progressive=True),
                                         "image/jpeg"), 200),
    Case("jpeg-4-big-app-segments", lambda: raw(jpeg_with_app_segments(4), "image/jpeg"), 200),
    Case("gif-comment-of-3000-blocks", lambda: raw(gif_with_comment_blocks(3000), "image/gif"),
         413, "image_too_complex"),
    Case("filenames-with-path-and-unicode", lambda: multipart(
        png(), png(), names=["../../etc/passwd", "ünï cødé.png"]), 200, images=2,
         check=_filename_echoed),
    Case("octet-stream-content-type", lambda: raw(png(), "application/octet-stream"), 200),
    # -- how the request is framed ----------------------------------------------------------
    Case("content-type-text-plain", lambda: raw(png(), "text/plain"), 415,
         "unsupported_media_type"),
    Case("content-type-json", lambda: raw(png(), "application/json"), 415,
         "unsupported_media_type"),
    Case("urlencoded-form", lambda: Req(data={"tau": "0.5"}), 415, "unsupported_media_type"),
    Case("no-content-type-with-body", lambda: raw(png(), None), 415, "unsupported_media_type"),
    Case("multipart-no-file", lambda: multipart_raw(b"--xyz--\r\n"), 400, "missing_file"),
    Case("multipart-text-field-named-file", text_field_named_file, 400, "missing_file"),
    Case("multipart-other-field", lambda: Req(files={"image": ("a.png", png(), "image/png")}), 400,
         "unexpected_field", ("image",)),
    Case("multipart-no-boundary", lambda: multipart_raw(b"garbage", boundary=None), 400,
         "invalid_multipart"),
    Case("multipart-unterminated", lambda: multipart_raw(
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png()[:100]), 400),
    Case("multipart-too-many-fields", lambda: Req(data={f"k{i}": "v" for i in range(40)},
                                                  files=[("file", ("a.png", png(), "image/png"))]),
         400, "invalid_multipart"),
    # -- query parameters -------------------------------------------------------------------
    Case("top-k-huge", lambda: raw(png(), query="?top_k=1000000000"), 200,
         check=_top_k_clamped),
    Case("top-k-5000-digits", lambda: raw(png(), query="?top_k=" + "9" * 5000), 422,
         "invalid_parameter", ("top_k",)),
    Case("top-k-zero", lambda: raw(png(), query="?top_k=0"), 422, "invalid_parameter",
         ("top_k",)),
    Case("top-k-negative", lambda: raw(png(), query="?top_k=-3"), 422, "invalid_parameter",
         ("top_k",)),
    Case("top-k-text", lambda: raw(png(), query="?top_k=two"), 422, "invalid_parameter",
         ("top_k",)),
    Case("top-k-fraction", lambda: raw(png(), query="?top_k=1.5"), 422, "invalid_parameter",
         ("top_k",)),
    Case("tau-above-1", lambda: raw(png(), query="?tau=1.5"), 422, "invalid_parameter", ("tau",)),
    Case("tau-negative", lambda: raw(png(), query="?tau=-0.1"), 422, "invalid_parameter",
         ("tau",)),
    Case("tau-nan", lambda: raw(png(), query="?tau=nan"), 422, "invalid_parameter", ("tau",)),
    Case("tau-inf", lambda: raw(png(), query="?tau=inf"), 422, "invalid_parameter", ("tau",)),
    Case("tau-minus-inf", lambda: raw(png(), query="?tau=-inf"), 422, "invalid_parameter",
         ("tau",)),
    Case("tau-text", lambda: raw(png(), query="?tau=abc"), 422, "invalid_parameter", ("tau",)),
    Case("tau-empty", lambda: raw(png(), query="?tau="), 422, "invalid_parameter", ("tau",)),
    Case("tau-bounds-ok", lambda: raw(png(), query="?tau=0&tau=1"), 200),
    Case("mode-unknown", lambda: raw(png(), query="?mode=bogus"), 422, "invalid_parameter",
         ("mode",)),
    Case("mode-original", lambda: raw(png(), query=ALL + "&mode=original"), 200),
]


@pytest.fixture(scope="module")
def client():
    settings = Settings(model_dir=SHIPPED_PACKAGE, max_body_bytes=MAX_BODY, max_files=MAX_FILES,
                        max_image_pixels=MAX_PIXELS, max_image_side=MAX_SIDE)
    with TestClient(create_app(settings, registry=CollectorRegistry()),
                    raise_server_exceptions=False) as c:
        yield c


def test_corpus_is_large_and_ids_unique():
    assert len(CORPUS) >= 20
    assert len({c.id for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CORPUS])
def test_hostile_input_gets_a_defined_answer(client, case: Case):
    r = case.request().send(client)
    assert r.status_code < 500, r.text
    assert r.status_code == case.status, r.text
    body = r.json()
    if case.status == 200:
        assert len(body["results"]) == case.images
        if body["top_k"] == len(client.get("/v1/model").json()["classes"]):  # all: they sum to 1
            for i in range(case.images):
                assert sum(_scores(body, i).values()) == pytest.approx(1.0, abs=1e-5)
        if case.check is not None:
            case.check(client, body)
        return
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if case.code is not None:
        assert body["error"]["code"] == case.code, body
    for text in case.says:
        assert text in body["error"]["message"], body


def test_server_is_still_healthy_after_the_corpus(client):
    for case in CORPUS:
        if case.status >= 400:
            case.request().send(client)
    r = client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics


@pytest.mark.parametrize("declared", ["0" * 5000 + "5", "\u00b9\u00b2\u00b3", "12x", "-1"])
def test_malformed_content_length_is_400_not_500(declared):
    """A Content-Length of 5,000 digits or of non-ASCII digits used to reach int() and answer 500."""
    app = create_app(Settings(model_dir=SHIPPED_PACKAGE), registry=CollectorRegistry())
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/classify", content=b"12345",
                        headers={"Content-Type": "image/png",
                                 "Content-Length": declared.encode("latin-1")})
    assert r.status_code == 400, r.text
    assert "Content-Length" in r.json()["error"]["message"]


def test_python_m_service_flags_set_the_settings(monkeypatch):
    """`python -m service --port N` used to serve on 8000: each flag sets its CPCNN_* variable."""
    from service.__main__ import parse_flags

    assert parse_flags(["--port", "8123", "--host", "0.0.0.0", "--model-dir", "models/x"]) == {
        "CPCNN_PORT": "8123", "CPCNN_HOST": "0.0.0.0", "CPCNN_MODEL_DIR": "models/x"}
    assert parse_flags([]) == {}
    with pytest.raises(SystemExit):
        parse_flags(["--port", "eighty"])


def test_trailing_slash_is_404_never_a_redirect_built_from_host():
    """POST /classify/ used to answer 307 to http://<Host header>/classify."""
    app = create_app(Settings(model_dir=SHIPPED_PACKAGE), registry=CollectorRegistry())
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/classify/", content=b"x", headers={"Host": "evil.example",
                                                            "Content-Type": "image/png"},
                        follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


def test_pixels_declared_by_a_whole_request_are_bounded():
    """Each image under the per-image limit, but together over CPCNN_MAX_REQUEST_PIXELS: 413
    before anything is decoded (16 small files declaring 6324×6324 each took 2.5 GB)."""
    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (120, 30, 200)).save(buf, format="PNG")
        return buf.getvalue()

    app = create_app(Settings(model_dir=SHIPPED_PACKAGE, max_request_pixels=100_000),
                     registry=CollectorRegistry())
    with TestClient(app, raise_server_exceptions=False) as client:
        one = client.post("/classify", files=[("file", ("a.png", png(300, 200), "image/png"))])
        two = client.post("/classify", files=[("file", (f"{i}.png", png(300, 200), "image/png"))
                                              for i in range(2)])
    assert one.status_code == 200, one.text
    assert two.status_code == 413, two.text
    error = two.json()["error"]
    assert error["code"] == "request_too_large" and "CPCNN_MAX_REQUEST_PIXELS" in error["message"]
