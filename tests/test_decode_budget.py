"""Decoding inside a budget (service.decode): the attacks of the outside attack run, at full size
and the default settings, each answered 4xx within a bounded time and memory; memory handed back
after a large request; the JPEG DCT-scaled decode; the TIFF strip and decode-time bounds.

Bounds are generous (seconds, hundreds of MB): they catch the amplifications (minutes of CPU,
gigabytes kept), not micro-timings.
"""

from __future__ import annotations

import io
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from service import decode
from service.app import create_app
from service.decode import DecodeLimits, decode_request, load_image, open_image, prepare
from service.settings import Settings
from tests.conftest import SHIPPED_PACKAGE
from tests.test_hostile_input import (
    encode,
    gif_with_comment_blocks,
    gradient,
    jpeg_claiming,
    jpeg_with_app_segments,
    jpeg_with_repeated_scans,
    noise,
    png_header_claiming,
    png_with_many_chunks,
)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this system")


@pytest.fixture(scope="module")
def client():
    """The shipped synthetic package at the default limits (10 MiB bodies, 16 files, 40 MP)."""
    with TestClient(create_app(Settings(model_dir=SHIPPED_PACKAGE), registry=CollectorRegistry()),
                    raise_server_exceptions=False) as c:
        assert c.post("/classify", content=encode(gradient()),
                      headers={"Content-Type": "image/png"}).status_code == 200  # warm
        yield c


def progressive_claiming_6000() -> bytes:
    data = bytearray(jpeg_with_repeated_scans(2000))
    sof = data.index(b"\xff\xc2")  # progressive frame header
    data[sof + 5:sof + 9] = struct.pack(">HH", 6000, 6000)
    return bytes(data)


ATTACKS = {  # name: (files of one request, expected status, expected code)
    "16-truncated-jpegs-claiming-6324x6324": ([jpeg_claiming(6324, 6324)] * 16, 413,
                                              "request_too_large"),
    "2-truncated-pngs-claiming-6000x6000": ([png_header_claiming(6000, 6000)] * 2, 400,
                                            "invalid_image"),
    "2000-scan-progressive-jpeg-claiming-6000x6000": ([progressive_claiming_6000()], 413,
                                                      "image_too_complex"),
    "png-with-400k-text-chunks": ([png_with_many_chunks(400_000)], 413, "image_too_complex"),
    "gif-with-1.5-mb-comment": ([gif_with_comment_blocks(750_000)], 413, "image_too_complex"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_in_bounded_time_and_memory(client, name):
    files, status, code = ATTACKS[name]
    before = rss_mb()
    t0 = time.perf_counter()
    r = client.post("/classify", files=[("file", (f"{i}.img", f, "application/octet-stream"))
                                         for i, f in enumerate(files)])
    seconds = time.perf_counter() - t0
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert seconds < 3.0, f"{name} took {seconds:.1f} s"
    assert rss_mb() - before < 150, f"{name} kept {rss_mb() - before:.0f} MB"


def test_memory_of_large_requests_returns_to_the_os():
    """Four requests at once, each of two 20 MP images (120 MB of RGB decoded per request, in
    worker threads, each with an allocator arena of its own): afterwards RSS is back within 10%
    of before. Without the trim it stayed ~300 MB higher."""
    big = encode(gradient((5000, 4000)), "PNG")
    limits = DecodeLimits(max_pixels=10**8, max_side=16384, max_request_pixels=10**8, budget_s=60)
    before = rss_mb()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            for pixels, _ in pool.map(
                    lambda _: decode_request([big, big], ["a.png", "b.png"], limits, 64), range(4)):
                assert pixels.shape == (2, 64, 64, 3)
    assert rss_mb() <= before * 1.10, (before, rss_mb())


def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_twice_the_input_side():
    photo = encode(noise((1200, 900)).resize((2400, 1800)), "JPEG", quality=90)
    scaled = load_image(open_image(photo, max_pixels=10**8), max_pixels=10**8, min_side=128)
    assert scaled.size == (300, 225)  # 1/8: 225 >= 128, 1/16 is not a JPEG scale
    full = load_image(open_image(photo, max_pixels=10**8), max_pixels=10**8)
    assert full.size == (2400, 1800)
    a, b = prepare(scaled, 64).astype(int), prepare(full, 64).astype(int)
    assert np.abs(a - b).mean() < 4  # the model sees (nearly) the same pixels
    small = encode(gradient((200, 160)), "JPEG")  # already near the input: decoded as is
    assert load_image(open_image(small, max_pixels=10**8), max_pixels=10**8,
                      min_side=128).size == (200, 160)


def test_a_tiff_of_more_strips_than_max_tiles_is_refused(monkeypatch):
    tiff = encode(gradient((8, 300)), "TIFF", tiffinfo={278: 1})  # RowsPerStrip 1: 300 strips
    limits = DecodeLimits(max_pixels=10**6, max_side=4096, max_request_pixels=10**7, budget_s=5)
    pixels, _ = decode_request([tiff], ["strips.tiff"], limits, 32)
    assert pixels.shape == (1, 32, 32, 3)
    monkeypatch.setattr(decode, "MAX_TILES", 100)
    with pytest.raises(decode.LimitExceeded, match="300 strips"):
        decode_request([tiff], ["strips.tiff"], limits, 32)


def test_decoding_past_the_budget_is_refused_and_frees_the_image():
    big = encode(noise((600, 500)).resize((3000, 2500)), "PNG")
    limits = DecodeLimits(max_pixels=10**8, max_side=16384, max_request_pixels=10**8,
                          budget_s=0.001)
    closed: list[Image.Image] = []
    real_close = Image.Image.close

    def spy(self):
        closed.append(self)
        real_close(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "close", spy)
        with pytest.raises(decode.LimitExceeded, match="CPCNN_DECODE_BUDGET_S") as e:
            decode_request([big, big], ["a.png", "b.png"], limits, 32)
    assert e.value.code == "decode_budget_exceeded"
    assert len({id(img) for img in closed}) >= 2  # both opened images released
    roomy = DecodeLimits(max_pixels=10**8, max_side=16384, max_request_pixels=10**8, budget_s=60)
    assert decode_request([big], ["a.png"], roomy, 32)[0].shape == (1, 32, 32, 3)


def test_big_app_segments_are_parsed_off_the_event_loop(client, monkeypatch, thread_hops):
    """A body over 64 KiB has even its headers parsed in a worker thread (a 2 MB APP segment
    used to be parsed on the loop and stall every other request)."""
    data = jpeg_with_app_segments(34)  # ~2 MB of APP15
    assert len(data) > 2_000_000
    opened: list[bool] = []
    real_open = decode.open_request

    def open_spy(*args, **kwargs):
        opened.append(True)
        return real_open(*args, **kwargs)

    monkeypatch.setattr("service.intake.open_request", open_spy)  # the loop's door: unused
    r = client.post("/classify", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert "decode_request" in thread_hops and not opened


def test_header_reads_are_counted_only_while_parsing_the_header():
    """A PNG whose pixels come in thousands of IDAT chunks is ordinary: only the header's reads
    count against MAX_HEADER_READS."""
    buf = io.BytesIO()
    img = noise((400, 300))
    img.save(buf, "PNG")
    data = buf.getvalue()
    # re-chunk the IDAT stream into 64-byte chunks: thousands of reads while decoding
    from tests.test_hostile_input import png_chunk
    pos, idat, head = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            idat += body
        elif kind != b"IEND":
            head += data[pos:pos + 12 + length]
        pos += 12 + length
    chunks = b"".join(png_chunk(b"IDAT", idat[i:i + 64]) for i in range(0, len(idat), 64))
    many = data[:8] + head + chunks + png_chunk(b"IEND", b"")
    assert len(idat) // 64 > decode.MAX_HEADER_READS
    limits = DecodeLimits(max_pixels=10**6, max_side=4096, max_request_pixels=10**7, budget_s=30)
    pixels, _ = decode_request([many], ["many-idat.png"], limits, 32)
    assert np.array_equal(pixels[0], prepare(img, 32))
