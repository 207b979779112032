"""A real server process as `make serve` starts it (`python -m service`): start-up, a multipart
POST over TCP, /metrics through promtool."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench.launch import child_env, free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]


def start_server(model_dir: Path, port: int, **env: str) -> subprocess.Popen:
    full_env = child_env(CPCNN_MODEL_DIR=str(model_dir), **env)
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def server(synthetic_package):
    port = free_port()
    proc = start_server(synthetic_package, port, CPCNN_ADMIN_TOKEN="tok")
    base = f"http://127.0.0.1:{port}"
    try:
        problem = wait_until_ready(f"{base}/readyz", alive=lambda: proc.poll() is None,
                                   timeout=120)
        if problem:
            pytest.fail(f"server {problem}:\n{stop(proc)}")
        yield base
    finally:
        log = stop(proc)
        assert "tok" not in log  # the admin token is never logged
        # The backend that serves is named at start-up (the default: ONNX Runtime, fp32).
        assert "on onnxruntime fp32" in log, log


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, "PNG")
    return buf.getvalue()


def test_uvicorn_answers_multipart_post(server):
    r = httpx.post(f"{server}/classify?top_k=2",
                   files=[("file", ("a.png", png((255, 0, 0)), "image/png")),
                          ("file", ("b.png", png((0, 0, 255)), "image/png"))], timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [res["filename"] for res in body["results"]] == ["a.png", "b.png"]
    assert "total;dur=" in r.headers["server-timing"]
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{server}/admin/tau", headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200


def test_uvicorn_metrics_pass_promtool(server):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y prometheus)")
    httpx.post(f"{server}/classify", content=png((0, 255, 0)), headers={"Content-Type": "image/png"})
    text = httpx.get(f"{server}/metrics").text
    assert "cpcnn_flops_executed_total" in text and "process_cpu_seconds_total" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_broken_package_exits_with_one_clear_line(synthetic_package, tmp_path):
    broken = tmp_path / "pkg"
    shutil.copytree(synthetic_package, broken)
    (broken / "trunk.onnx").unlink()
    proc = start_server(broken, free_port())
    out = stop(proc) if proc.wait(timeout=120) is not None else ""
    assert proc.returncode != 0
    assert "cannot start: model package" in out and "missing file trunk.onnx" in out
    assert "Traceback" not in out


def test_missing_model_dir_exits_with_one_clear_line(tmp_path):
    proc = start_server(tmp_path / "nope", free_port())
    proc.wait(timeout=120)
    out = stop(proc)
    assert proc.returncode != 0
    assert "CPCNN_MODEL_DIR" in out and "does not exist" in out
    assert "Traceback" not in out
