"""The HTTP layer under slow and vanishing clients, on a real `python -m service` process with
short timeouts: silent and trickling connections are closed, a stalled body is a 408, an aborted
upload is neither a 5xx nor a traceback, 200 slow connections do not starve normal requests, and
the event loop answers /healthz while a request is being decoded.

Bounds are generous (seconds), far above what the server needs and far below "forever".
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

import httpx
import pytest

from bench.launch import free_port, wait_until_ready
from tests.test_hostile_input import encode, gradient
from tests.test_service_server import start_server, stop

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def server(synthetic_package):
    port = free_port()
    proc = start_server(synthetic_package, port, CPCNN_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT),
                        CPCNN_BODY_TIMEOUT_S=str(BODY_TIMEOUT), CPCNN_KEEP_ALIVE_S="1")
    base = f"http://127.0.0.1:{port}"
    log = ""
    try:
        problem = wait_until_ready(f"{base}/readyz", alive=lambda: proc.poll() is None, timeout=120)
        if problem:
            pytest.fail(f"server {problem}:\n{stop(proc)}")
        yield base, port, lambda: log
    finally:
        log = stop(proc)
        assert "Traceback" not in log, log


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``s`` within ``seconds``, and what it sent first."""
    s.settimeout(seconds)
    received = b""
    try:
        while chunk := s.recv(4096):
            received += chunk
        return True, received
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        return True, received


def test_a_connection_that_sends_nothing_is_closed(server):
    _, port, _ = server
    s = connect(port)
    t0 = time.monotonic()
    closed, said = closed_within(s, HEADER_TIMEOUT + 5)
    assert closed and time.monotonic() - t0 >= HEADER_TIMEOUT * 0.9
    assert said.startswith(b"HTTP/1.1 408")


def test_trickled_headers_are_cut_off(server):
    _, port, _ = server
    s = connect(port)
    t0 = time.monotonic()
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ":
        try:
            s.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)  # a byte every 100 ms keeps any idle timer from firing
        if time.monotonic() - t0 > HEADER_TIMEOUT + 5:
            break
    closed, _ = closed_within(s, HEADER_TIMEOUT + 5)
    assert closed and time.monotonic() - t0 < HEADER_TIMEOUT + 6


def test_the_header_deadline_rearms_for_the_next_request_on_a_kept_alive_connection(server):
    _, port, _ = server
    s = connect(port)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # second request: headers never finish
    closed, _ = closed_within(s, HEADER_TIMEOUT + 5)
    assert closed


def test_a_stalled_body_is_a_408(server):
    base, port, _ = server
    s = connect(port)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n")  # and then nothing, ever
    t0 = time.monotonic()
    closed, said = closed_within(s, BODY_TIMEOUT + 5)
    assert said.startswith(b"HTTP/1.1 408"), said
    assert b"body_timeout" in said and time.monotonic() - t0 < BODY_TIMEOUT + 5


def test_an_aborted_upload_is_counted_as_499_not_5xx(server):
    base, port, _ = server
    for _ in range(3):
        s = connect(port)
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000)
        time.sleep(0.2)
        s.close()  # mid-upload
    time.sleep(0.5)
    metrics = httpx.get(f"{base}/metrics").text
    assert 'status="499"' in metrics
    assert not [line for line in metrics.splitlines()
                if line.startswith("cpcnn_http_requests_total") and 'status="5' in line]


def test_200_slow_connections_do_not_starve_normal_requests(server):
    base, port, _ = server
    image = encode(gradient())

    def normal(n: int) -> list[float]:
        times = []
        with httpx.Client(timeout=30) as client:
            for _ in range(n):
                t0 = time.perf_counter()
                r = client.post(f"{base}/classify", content=image,
                                headers={"Content-Type": "image/png"})
                assert r.status_code == 200
                times.append(time.perf_counter() - t0)
        return times

    baseline = normal(30)
    slow = []
    for _ in range(200):
        s = connect(port)
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")  # headers that never end
        slow.append(s)
    try:
        loaded = normal(30)
    finally:
        for s in slow:
            s.close()
    p99 = statistics.quantiles(loaded, n=100)[98]
    assert p99 < max(10 * statistics.quantiles(baseline, n=100)[98], 0.5), (baseline, loaded)


def test_healthz_answers_while_a_request_is_being_decoded(server):
    """Decoding (and, for big bodies, header parsing) runs in a worker thread: the event loop
    keeps answering. Target 50 ms; asserted on the median, with the maximum bounded loosely."""
    base, _, _ = server
    heavy = encode(gradient((6000, 5000)))  # 30 MP to inflate and resample
    done, answers = threading.Event(), []

    def classify_heavy():
        try:
            with httpx.Client(timeout=60) as client:
                for _ in range(3):
                    answers.append(client.post(f"{base}/classify", content=heavy,
                                               headers={"Content-Type": "image/png"}).status_code)
        finally:
            done.set()

    worker = threading.Thread(target=classify_heavy)
    latencies = []
    with httpx.Client(timeout=10) as client:
        client.get(f"{base}/healthz")
        worker.start()
        while not done.is_set():
            t0 = time.perf_counter()
            assert client.get(f"{base}/healthz").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    worker.join()
    assert answers == [200] * 3
    assert len(latencies) >= 5
    assert statistics.median(latencies) < 0.05 and max(latencies) < 1.0, latencies
