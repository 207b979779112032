"""Graceful shutdown of a real server process: SIGTERM turns readiness 503 first, every request in
flight still gets its 200, and the process exits 0."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.launch import child_env, free_port, wait_until_ready
from tests.conftest import SHIPPED_PACKAGE
from tests.test_service_server import stop

ROOT = Path(__file__).resolve().parents[1]
IN_FLIGHT = 6  # concurrent slow requests
FILES = 16  # images per request (the default CPCNN_MAX_FILES)


def start(port: int, **env: str) -> subprocess.Popen:
    full_env = child_env(CPCNN_MODEL_DIR=str(SHIPPED_PACKAGE), CPCNN_HOST="127.0.0.1",
                    CPCNN_PORT=str(port), **env)
    return subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(proc: subprocess.Popen, base: str) -> None:
    problem = wait_until_ready(f"{base}/readyz", alive=lambda: proc.poll() is None, timeout=120)
    if problem:
        pytest.fail(f"server {problem}:\n{stop(proc)}")


def in_flight(base: str) -> int:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(r"^cpcnn_in_flight_requests (\S+)$", text, re.M)
    return int(float(match.group(1))) - 1 if match else 0  # less this /metrics request


def slow_body() -> list:
    """16 large (3 MP) but small-to-send JPEGs: decoding them takes a while."""
    y, x = np.mgrid[0:1500, 0:2000]
    rgb = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=70)
    return [("file", (f"{i}.jpg", buf.getvalue(), "image/jpeg")) for i in range(FILES)]


def test_sigterm_drains_in_flight_requests_and_exits_zero():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(port, CPCNN_SHUTDOWN_DELAY_S="2.0")
    try:
        wait_ready(proc, base)
        files = slow_body()
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(httpx.post, f"{base}/classify?top_k=1", files=files,
                                   timeout=300) for _ in range(IN_FLIGHT)]
            deadline = time.monotonic() + 60
            while in_flight(base) < IN_FLIGHT:  # every request has reached the app
                assert time.monotonic() < deadline, "requests never got in flight"
                assert not any(f.done() for f in futures), "requests finished too soon"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            readiness = []  # /readyz on new connections, while the server still accepts them
            while proc.poll() is None:
                try:
                    readiness.append(httpx.get(f"{base}/readyz", timeout=5).status_code)
                except httpx.TransportError:
                    break  # the listening socket is closed: uvicorn is draining
                time.sleep(0.05)
            responses = [f.result() for f in futures]
        assert proc.wait(timeout=120) == 0
    finally:
        log = stop(proc)
    assert [r.status_code for r in responses] == [200] * IN_FLIGHT, [r.text for r in responses]
    assert all(len(r.json()["results"]) == FILES for r in responses)
    assert readiness and set(readiness) == {503}, readiness  # 503 first, while still serving
    assert "Traceback" not in log, log


def test_sigterm_with_a_stalled_upload_exits_within_the_grace_period():
    """A client that sent half a body and stopped used to hold SIGTERM without limit."""
    import socket

    port = free_port()
    proc = start(port, CPCNN_SHUTDOWN_GRACE_S="2", CPCNN_BODY_TIMEOUT_S="600")
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              b"Content-Length: 1000000\r\n\r\n" + b"\0" * 1000)  # and nothing more
    time.sleep(0.5)
    try:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < 2 + 8
    finally:
        s.close()
        log = stop(proc)
    assert proc.returncode == 0, log
