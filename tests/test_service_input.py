"""Exact conversions of unusual images, and the decode/prepare units.

The corpus of hostile and odd requests, each with its defined answer, is the table in
``test_hostile_input.py``; here are the checks that compare two requests or test one function.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from modelpack.preprocess import resize_center_crop
from service.app import create_app
from service.decode import decode, prepare
from service.errors import InvalidImage, LimitExceeded
from service.settings import Settings
from tests.test_hostile_input import encode, gradient

MAX_BODY = 300_000
MAX_FILES = 3
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def client(synthetic_package):
    settings = Settings(model_dir=synthetic_package, max_body_bytes=MAX_BODY, max_files=MAX_FILES,
                        max_image_pixels=MAX_PIXELS)
    with TestClient(create_app(settings, registry=CollectorRegistry())) as c:
        yield c


def post_raw(client, data: bytes, content_type: str | None = "image/png", query: str = ""):
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post(f"/classify{query}", content=data, headers=headers)


# -- unusual images are converted and classified ---------------------------------------------
def classify(client, data: bytes) -> dict:
    r = post_raw(client, data, query="?top_k=100&tau=1")
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def scores(result: dict) -> dict[int, float]:
    return {p["index"]: p["score"] for p in result["predictions"]}


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


def test_prepare_bounds_the_work_of_a_long_strip(monkeypatch):
    """A 10000 x 1 strip is not scaled to 320000 x 32 before the crop; the result matches."""
    strip = Image.fromarray(np.tile(np.arange(10000, dtype=np.uint8)[None, :, None], (1, 1, 3)))
    full = np.asarray(resize_center_crop(strip, 32))  # training's way: whole strip scaled
    sizes = []
    real_resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(size)
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    arr = prepare(strip, 32)
    assert sizes and max(w * h for w, h in sizes) <= 32 * 32  # only the kept square resampled
    assert arr.shape == (32, 32, 3)
    assert np.abs(arr.astype(int) - full).max() <= 1
    ordinary = gradient((300, 200))  # ordinary aspect ratios: exactly training's function
    assert np.array_equal(prepare(ordinary, 32), np.asarray(resize_center_crop(ordinary, 32)))


# -- where decoding runs ---------------------------------------------------------------------
@pytest.mark.parametrize("side, in_thread", [(64, False), (128, False), (129, True), (400, True)])
def test_small_images_decode_on_the_loop_large_ones_in_a_worker_thread(client, monkeypatch,
                                                                       thread_hops, side, in_thread):
    """Up to INLINE_PREPARE_MAX_PIXELS (128²) a thread hop costs more than decoding; above it the
    event loop must not stall, so decoding goes to a worker thread. Same answer either way."""
    from service import intake

    assert intake.INLINE_PREPARE_MAX_PIXELS == 128 * 128
    hops = thread_hops
    data = encode(gradient((side, side)))
    result = classify(client, data)
    assert ("decode_request" in hops) is in_thread, hops
    monkeypatch.undo()
    again = classify(client, data)
    assert again["predictions"] == result["predictions"] and again["heads"] == result["heads"]
