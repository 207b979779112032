"""The Ray Serve application on a real local Ray: 2 replicas, one admin call reaches both.

Ray is started here (``ray start --head`` on free ports), the application deployed from a Serve
config as a user would (``serve deploy``), and Ray stopped at the end.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from modelpack.manifest import copy_package
from tests.conftest import AUTH, SHIPPED_PACKAGE, TOKEN

pytest.importorskip("ray.serve", reason="the ray extra is not installed "
                                         "(pip install 'cpcnn-serve[ray]')")

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
B = "0.2.0-b"


def http(method: str, url: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, got, text = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, got, text = e.code, dict(e.headers), e.read()
    try:
        return status, got, json.loads(text or b"{}")
    except ValueError:  # Ray's proxy answers in plain text before the app is up
        return status, got, {"text": text.decode(errors="replace")}


def distinct_ports(n: int) -> list[int]:
    """``n`` different free ports (held open together while chosen, so none repeats), the last
    one with its successor free too (the second replica's metrics port)."""
    while True:
        socks = []
        try:
            for _ in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            ports = [s.getsockname()[1] for s in socks]
            with socket.socket() as nxt:
                nxt.bind(("127.0.0.1", ports[-1] + 1))
            if ports[-1] + 1 not in ports:
                return ports
        except OSError:
            pass
        finally:
            for s in socks:
                s.close()


def run(*args: str, timeout: float) -> None:
    """A Ray CLI command; its output in the failure when it fails."""
    # Token authentication off: a loopback-only cluster of this test (a real cluster keeps it on;
    # the fleet sends Ray's token header then).
    # A proxy slow to start on a busy 2-core machine is not a failure: Serve's 5-s readiness
    # check would kill and restart it, and the deploy fail.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray with the application deployed from a config: (base URL, metrics ports)."""
    root = tmp_path_factory.mktemp("ray")
    models = root / "models"
    copy_package(SHIPPED_PACKAGE, models / "a")
    copy_package(SHIPPED_PACKAGE, models / "b", version=B)
    gcs, dashboard, port, metrics = distinct_ports(4)
    config = root / "serve_config.json"  # JSON is YAML: no YAML writer needed here
    config.write_text(json.dumps({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "cpcnn", "route_prefix": "/", "import_path": "service.ray_app:build",
            "args": {"num_replicas": 2, "num_cpus": 0.5, "metrics_port": metrics},
            "runtime_env": {"env_vars": {
                "CPCNN_MODEL_DIR": str(models / "a"), "CPCNN_ADMIN_TOKEN": TOKEN,
                "CPCNN_INTRA_OP_THREADS": "1", "CPCNN_VERIFY_CHECKSUMS": "true",
                "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{dashboard}"}},
            "deployments": [{"name": "cpcnn", "user_config": {}}]}]}))
    # Ray's sockets live under its temp dir; a Unix socket path must stay under 108 bytes.
    env_dir = Path(tempfile.mkdtemp(prefix="cpray", dir="/tmp"))
    run(str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(gcs),
        "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--disable-usage-stats", f"--temp-dir={env_dir}", timeout=180)
    try:
        run(str(BIN / "serve"), "deploy", str(config), "-a", f"http://127.0.0.1:{dashboard}",
            timeout=120)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        seen: set[str] = set()
        while len(seen) < 2:  # both replicas up and ready
            assert time.monotonic() < deadline, "the replicas did not get ready in 180 s"
            try:
                status, headers, _ = http("GET", f"{base}/readyz")
                if status == 200:
                    seen.add(headers["cpcnn-replica"])
            except (urllib.error.URLError, OSError, KeyError):
                pass
            time.sleep(0.3)
        yield base, (metrics, metrics + 1)
    finally:
        run(str(BIN / "ray"), "stop", "--force", timeout=120)
        shutil.rmtree(env_dir, ignore_errors=True)


def classify(base: str) -> tuple[int, dict, dict]:
    return http("POST", f"{base}/classify", png(), {"Content-Type": "image/png"})


def test_classify_works_on_the_ray_application(cluster):
    base, _ = cluster
    status, headers, body = classify(base)
    assert status == 200 and headers["cpcnn-replica"]
    assert body["model"]["version"] == "0.1.0" and body["results"][0]["predictions"]


def test_one_tau_change_reaches_every_replica(cluster):
    base, metrics_ports = cluster
    headers = {**AUTH, "Content-Type": "application/json"}
    status, _, body = http("PUT", f"{base}/admin/tau", b'{"tau": 0.9}', headers)
    assert status == 200 and body["tau"] == 0.9
    replicas = set()
    for _ in range(60):
        status, h, body = classify(base)
        assert status == 200 and body["tau"] == 0.9
        replicas.add(h["cpcnn-replica"])
    assert len(replicas) == 2  # both replicas answered, both with the new τ
    for port in metrics_ports:  # each replica's own registry, scraped once each
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b"\ncpcnn_tau 0.9\n" in text


def test_a_reload_reaches_every_replica_and_tau_stays(cluster):
    base, _ = cluster
    headers = {**AUTH, "Content-Type": "application/json"}
    status, _, body = http("POST", f"{base}/admin/reload", b'{"package": "b"}', headers)
    assert status == 200, body
    assert body["model"]["version"] == B and body["previous"]["version"] == "0.1.0"
    replicas = set()
    for _ in range(40):
        status, h, body = classify(base)
        assert status == 200 and body["model"]["version"] == B
        assert body["tau"] == 0.9  # set by an operator: kept across the reload
        replicas.add(h["cpcnn-replica"])
    assert len(replicas) == 2


def test_a_broken_package_is_refused_before_any_replica_tries_it(cluster, tmp_path):
    base, _ = cluster
    headers = {**AUTH, "Content-Type": "application/json"}
    status, _, body = http("POST", f"{base}/admin/reload", b'{"package": "nope"}', headers)
    assert status == 404 and body["error"]["code"] == "package_not_found"
    status, _, body = classify(base)
    assert status == 200 and body["model"]["version"] == B
