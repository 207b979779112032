"""Admission control (service.admission): work beyond the bounds is refused at once with 503 +
Retry-After, counted, in both API shapes; a burst on a real server gets 200s and fast refusals,
never a queue that grows until memory runs out."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from bench.launch import free_port, wait_until_ready
from service.app import create_app
from service.settings import Settings
from tests.conftest import SHIPPED_PACKAGE
from tests.test_hostile_input import encode, gradient
from tests.test_service_server import start_server, stop


@pytest.fixture
def client():
    app = create_app(Settings(model_dir=SHIPPED_PACKAGE, max_in_flight=2,
                              max_request_pixels=1_000_000, max_pixels_in_flight=1_000_000),
                     registry=CollectorRegistry())
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_requests_beyond_max_in_flight_are_refused_before_their_body_is_read(client):
    admission = client.app.state.service.admission
    image = encode(gradient())
    read = []

    def body():
        read.append(True)
        yield image

    admission.requests = admission.max_requests  # as if two requests were in flight
    try:
        r = client.post("/classify", content=body(), headers={"Content-Type": "image/png"})
        v2 = client.post("/v2/models/synthetic/infer", json={"inputs": []})
        health = client.get("/healthz")
    finally:
        admission.requests = 0
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded" and "CPCNN_MAX_IN_FLIGHT" in r.text
    assert not read  # refused before a byte of the body
    assert v2.status_code == 503 and set(v2.json()) == {"error"}  # the V2 error shape
    assert health.status_code == 200  # health, metadata and admin are never refused
    ok = client.post("/classify", content=image, headers={"Content-Type": "image/png"})
    assert ok.status_code == 200 and admission.requests == 0  # released after each request
    metrics = client.get("/metrics").text
    assert 'cpcnn_overload_rejections_total{bound="requests"} 2.0' in metrics
    assert 'endpoint="/classify",method="POST",status="503"' in metrics


def test_pixels_beyond_the_decoding_bound_are_refused_and_released(client):
    admission = client.app.state.service.admission
    image = encode(gradient((600, 500)))  # 300,000 pixels
    admission.pixels = 800_000  # others are decoding
    try:
        r = client.post("/classify", content=image, headers={"Content-Type": "image/png"})
    finally:
        admission.pixels = 0
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    assert "CPCNN_MAX_PIXELS_IN_FLIGHT" in r.text and r.headers["retry-after"] == "1"
    ok = client.post("/classify", content=image, headers={"Content-Type": "image/png"})
    assert ok.status_code == 200 and admission.pixels == 0
    assert 'cpcnn_overload_rejections_total{bound="pixels"} 1.0' in client.get("/metrics").text


def test_the_pixel_bound_must_hold_a_whole_request():
    with pytest.raises(ValueError, match="CPCNN_MAX_PIXELS_IN_FLIGHT"):
        Settings(model_dir=SHIPPED_PACKAGE, max_request_pixels=10, max_pixels_in_flight=5)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_burst_gets_answers_or_fast_refusals_and_memory_comes_back(synthetic_package):
    """96 clients at once, each 4 images of 3 MP (12 MP, ~36 MB of RGB per request), against
    bounds of 8 requests and 40 MP in flight: every answer is a 200 or a 503 with Retry-After,
    the server stays under a ceiling, gives the memory back and serves normally right after."""
    port = free_port()
    proc = start_server(synthetic_package, port, CPCNN_MAX_IN_FLIGHT="8",
                        CPCNN_MAX_REQUEST_PIXELS="12000000", CPCNN_MAX_PIXELS_IN_FLIGHT="40000000")
    base = f"http://127.0.0.1:{port}"
    try:
        problem = wait_until_ready(f"{base}/readyz", alive=lambda: proc.poll() is None, timeout=120)
        assert problem is None, stop(proc)
        small = encode(gradient())
        with httpx.Client() as c:
            for _ in range(5):
                c.post(f"{base}/classify", content=small, headers={"Content-Type": "image/png"})
        before = rss_mb(proc.pid)
        big = encode(gradient((2000, 1500)))
        files = [("file", (f"{i}.png", big, "image/png")) for i in range(4)]
        peak, stop_sampling = [before], threading.Event()

        def sample():
            while not stop_sampling.wait(0.05):
                peak.append(rss_mb(proc.pid))

        def one(_):
            with httpx.Client(timeout=60) as c:
                r = c.post(f"{base}/classify", files=files)
                return r.status_code, r.headers.get("retry-after")

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(96) as pool:
            answers = list(pool.map(one, range(96)))
        burst_seconds = time.monotonic() - t0
        stop_sampling.set()
        sampler.join()
        statuses = {s for s, _ in answers}
        assert statuses <= {200, 503} and 200 in statuses and 503 in statuses, answers
        assert all(retry == "1" for s, retry in answers if s == 503)
        assert max(peak) - before < 1500, (before, max(peak))  # the bounds' ceiling, generously
        time.sleep(1)
        with httpx.Client() as c:
            t0 = time.perf_counter()
            assert c.post(f"{base}/classify", content=small,
                          headers={"Content-Type": "image/png"}).status_code == 200
            assert time.perf_counter() - t0 < 1.0
        assert rss_mb(proc.pid) - before < 150, (before, rss_mb(proc.pid))
        assert burst_seconds < 120
    finally:
        log = stop(proc)
    assert "Traceback" not in log, log
