"""Bad input never causes a 5xx; unusual image modes are converted and classified."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.decode import decode, prepare
from service.errors import InvalidImage, LimitExceeded
from service.settings import Settings

MAX_BODY = 300_000
MAX_FILES = 3
MAX_PIXELS = 1_000_000


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(size=(48, 40)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 90, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def client(synthetic_package):
    settings = Settings(model_dir=synthetic_package, max_body_bytes=MAX_BODY, max_files=MAX_FILES,
                        max_image_pixels=MAX_PIXELS)
    with TestClient(create_app(settings, registry=CollectorRegistry())) as c:
        yield c


def post_raw(client, data: bytes, content_type: str | None = "image/png", query: str = ""):
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post(f"/classify{query}", content=data, headers=headers)


def post_files(client, *blobs: bytes, query: str = ""):
    return client.post(f"/classify{query}",
                       files=[("file", (f"f{i}.img", b, "application/octet-stream"))
                              for i, b in enumerate(blobs)])


def assert_error(r, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


# -- bad input -> 4xx JSON -------------------------------------------------------------------
def test_non_image_bytes(client):
    assert_error(post_raw(client, b"this is not an image at all"), 400, "invalid_image")
    r = post_files(client, encode(gradient()), b"GIF89a but not really")
    assert_error(r, 400, "invalid_image")
    assert "file 2" in r.json()["error"]["message"]  # says which file


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(client, fmt):
    data = encode(gradient((200, 160)), fmt)
    for cut in (len(data) // 2, 40):
        assert_error(post_raw(client, data[:cut], f"image/{fmt.lower()}"), 400, "invalid_image")


def test_corrupt_png_checksum(client):
    data = bytearray(encode(gradient()))
    data[60] ^= 0xFF  # inside the IDAT chunk
    assert_error(post_raw(client, bytes(data)), 400, "invalid_image")


def test_empty_bodies(client):
    assert_error(post_raw(client, b""), 400, "empty_body")
    assert_error(client.post("/classify"), 400, "empty_body")
    assert_error(post_files(client, b""), 400, "invalid_image")  # an empty file part


@pytest.mark.parametrize("content_type", ["text/plain", "application/json",
                                          "application/x-www-form-urlencoded"])
def test_wrong_content_type(client, content_type):
    assert_error(post_raw(client, encode(gradient()), content_type), 415, "unsupported_media_type")


@pytest.mark.parametrize("query", ["?tau=1.5", "?tau=-0.1", "?tau=nan", "?tau=inf", "?tau=abc",
                                   "?top_k=0", "?top_k=-3", "?top_k=two", "?mode=bogus"])
def test_bad_parameters(client, query):
    r = post_raw(client, encode(gradient()), query=query)
    assert_error(r, 422, "invalid_parameter")
    name = query[1:].split("=")[0]
    assert name in r.json()["error"]["message"]


def test_multipart_without_file(client):
    assert_error(client.post("/classify", data={"tau": "0.5"}), 415)  # a urlencoded form
    r = client.post("/classify", files={"image": ("a.png", encode(gradient()), "image/png")})
    assert_error(r, 400, "unexpected_field")
    r = client.post("/classify", files={"file": (None, "just text")})
    assert_error(r, 400, "missing_file")
    r = client.post("/classify", content=b"--xyz--\r\n",
                    headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert_error(r, 400, "missing_file")
    r = client.post("/classify", content=b"garbage",
                    headers={"Content-Type": "multipart/form-data"})  # no boundary
    assert_error(r, 400, "invalid_multipart")


def test_body_too_large(client):
    big = b"\x89PNG" + b"\0" * MAX_BODY
    assert_error(post_raw(client, big), 413, "body_too_large")

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(10):
            yield b"\0" * (MAX_BODY // 5)

    assert_error(client.post("/classify", content=chunks(), headers={"Content-Type": "image/png"}),
                 413, "body_too_large")
    r = client.post("/classify", files=[("file", ("big.png", big, "image/png"))])
    assert_error(r, 413, "body_too_large")


def test_too_many_files(client):
    blob = encode(gradient((8, 8)))
    assert post_files(client, *[blob] * MAX_FILES).status_code == 200
    assert_error(post_files(client, *[blob] * (MAX_FILES + 1)), 413, "too_many_files")


def test_decompression_bomb(client):
    bomb = encode(Image.new("L", (2000, 1000)))  # 2 MP of zeros: a few KB of PNG
    assert len(bomb) < MAX_BODY
    r = post_raw(client, bomb)
    assert_error(r, 413, "image_too_large")
    assert str(MAX_PIXELS) in r.json()["error"]["message"]


def test_unsupported_format_is_refused(client):
    ico = encode(gradient((32, 32)), "ICO")
    assert_error(post_raw(client, ico, "image/x-icon"), 400, "invalid_image")


# -- unusual images are converted and classified ---------------------------------------------
def classify(client, data: bytes) -> dict:
    r = post_raw(client, data, query="?top_k=100&tau=1")
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def scores(result: dict) -> dict[int, float]:
    return {p["index"]: p["score"] for p in result["predictions"]}


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "CMYK", "I", "F", "I;16"])
def test_modes_are_converted_and_classified(client, mode):
    img = gradient()
    if mode == "I;16":
        wide = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(wide)  # uint16 -> mode I;16
    else:
        img = img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I", "F") else "PNG"
    result = classify(client, encode(img, fmt))
    assert sum(scores(result).values()) == pytest.approx(1.0)


def test_sixteen_bit_matches_eight_bit(client):
    grey8 = np.asarray(gradient().convert("L"))
    wide = Image.fromarray(grey8.astype(np.uint16) * 256 + 255)  # I;16, high byte = 8-bit value
    assert Image.open(io.BytesIO(encode(wide))).mode.startswith("I")
    assert scores(classify(client, encode(wide))) == pytest.approx(
        scores(classify(client, encode(Image.fromarray(grey8, "L")))))


def test_alpha_is_composited_on_white(client):
    rgba = Image.new("RGBA", (40, 40), (10, 200, 30, 0))  # fully transparent green
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    assert scores(classify(client, encode(rgba))) == pytest.approx(
        scores(classify(client, encode(white))))


def test_palette_with_transparency(client):
    p = gradient().convert("P")
    p.info["transparency"] = 0
    classify(client, encode(p, transparency=0))


def test_animated_image_uses_first_frame(client):
    frames = [Image.new("RGB", (40, 40), c) for c in ((250, 20, 20), (20, 20, 250), (20, 250, 20))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    first = Image.open(io.BytesIO(gif)).convert("RGB")  # frame 0 as Pillow decodes it
    assert scores(classify(client, gif)) == pytest.approx(scores(classify(client, encode(first))))
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert scores(classify(client, apng)) == pytest.approx(
        scores(classify(client, encode(frames[0]))))


# -- decode/prepare units --------------------------------------------------------------------
def test_decode_applies_exif_orientation():
    img = gradient((60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode(encode(img, "JPEG", exif=exif), max_pixels=10**6)
    assert decoded.size == (30, 60)


def test_decode_errors_name_the_input():
    with pytest.raises(InvalidImage, match="file 3"):
        decode(b"nope", max_pixels=100, name="file 3")
    with pytest.raises(LimitExceeded, match="100"):
        decode(encode(gradient((20, 20))), max_pixels=100)


def test_prepare_is_square_uint8_rgb():
    arr = prepare(gradient((50, 20)).convert("P"), 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
