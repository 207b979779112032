"""A real Prometheus scrapes a real uvicorn: what PromQL reads back is what the responses said.

The service (uvicorn, synthetic package) and Prometheus (the ``prometheus`` binary, Debian's
``prometheus`` package) both listen on 127.0.0.1 at free ports. Prometheus has one scrape job and
nothing else (no alerting, no remote write, no other targets) and keeps its TSDB in ``tmp_path``.
The test sends classify requests (τ=0, τ=1, the server's τ, ``mode=original``), waits for one scrape
that started after the service's counters reached their final values, and compares what
Prometheus' query API answers with what the test computed from the responses it got.

Skipped only when the ``prometheus`` binary is missing; any other problem fails.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.launch import child_env, free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
JOB = "cpcnn-it"
ADMIN_TOKEN = "it-admin-token"
SERVER_TAU = 0.375  # set with PUT /admin/tau; read back from the cpcnn_tau gauge
STARTUP_TIMEOUT_S = 120.0  # model load + warm-up, or Prometheus start, on a busy CI machine
SCRAPE_TIMEOUT_S = 30.0  # for the first scrape after the final state

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not installed (Debian: apt-get install -y prometheus)")


# -- processes ------------------------------------------------------------------------------------
@dataclass
class Proc:
    proc: subprocess.Popen
    log: Path
    base: str

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"<no log: {e}>"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s; always reaps the process."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def wait_ready(p: Proc, path: str, what: str) -> None:
    """Poll ``path`` until 200; fail (with the log) if the process exits or the deadline passes."""
    problem = wait_until_ready(f"{p.base}{path}", alive=lambda: p.proc.poll() is None,
                               timeout=STARTUP_TIMEOUT_S, interval=0.1)
    if problem:
        pytest.fail(f"{what} {problem} (exit code {p.proc.poll()}):\n{p.log_tail()}")


def start(argv: list[str], env: dict[str, str], log: Path, port: int) -> Proc:
    with log.open("w") as out:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    return Proc(proc, log, f"http://127.0.0.1:{port}")


def start_service(model_dir: Path, port: int, log: Path) -> Proc:
    env = child_env(CPCNN_MODEL_DIR=str(model_dir), CPCNN_ADMIN_TOKEN=ADMIN_TOKEN,
                    CPCNN_PROVIDERS="CPUExecutionProvider", CPCNN_INTRA_OP_THREADS="1")
    return start([sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
                  "--port", str(port)], env, log, port)


def start_prometheus(target: str, port: int, tmp_path: Path) -> Proc:
    assert PROMETHEUS is not None
    # JSON is YAML: one job, one local target; no alerting, rule files or remote write, so
    # Prometheus has nothing to reach off this machine.
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics", "scheme": "http",
                            "static_configs": [{"targets": [target]}]}],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2))
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy")}  # scrape 127.0.0.1 directly, never via a proxy
    return start([PROMETHEUS, f"--config.file={config_file}",
                  f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}",
                  "--web.page-title=cpcnn-integration-test", "--log.level=info"],
                 env, tmp_path / "prometheus.log", port)


@dataclass
class Stack:
    service: Proc
    prometheus: Proc


@pytest.fixture
def stack(synthetic_package: Path, tmp_path: Path) -> Iterator[Stack]:
    """uvicorn and Prometheus, started together: Prometheus applies a new target list only
    every 5 s (its discovery manager's throttle), so that wait overlaps the model's warm-up."""
    service_port = free_port()
    service = start_service(synthetic_package, service_port, tmp_path / "uvicorn.log")
    try:
        prometheus_port = free_port()
        while prometheus_port == service_port:  # uvicorn may not have bound its port yet
            prometheus_port = free_port()
        prometheus = start_prometheus(f"127.0.0.1:{service_port}", prometheus_port, tmp_path)
        try:
            wait_ready(service, "/readyz", "uvicorn")
            wait_ready(prometheus, "/-/ready", "prometheus")
            yield Stack(service, prometheus)
        finally:
            stop(prometheus.proc)
    finally:
        stop(service.proc)


# -- Prometheus queries ---------------------------------------------------------------------------
def query(prom: Proc, promql: str) -> list[dict]:
    r = httpx.get(f"{prom.base}/api/v1/query", params={"query": promql}, timeout=10)
    assert r.status_code == 200, f"{promql}: {r.status_code} {r.text}"
    body = r.json()
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "vector", body
    return body["data"]["result"]


def scalar(prom: Proc, promql: str) -> float:
    """The single value of an instant vector query (which must have exactly one element)."""
    result = query(prom, promql)
    assert len(result) == 1, f"{promql}: expected one series, got {result}"
    return float(result[0]["value"][1])


# -- the test -------------------------------------------------------------------------------------
def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "PNG")
    return buf.getvalue()


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 30), (20, 20, 20), (128, 64, 200)]

# (query string, number of files): τ=0, τ=1, the server's τ, and the original model.
REQUESTS = [
    ({"tau": "0"}, 1), ({"tau": "0"}, 3), ({"tau": "1"}, 2), ({"tau": "1"}, 1),
    ({}, 2), ({"mode": "original"}, 2), ({"mode": "original", "top_k": "1"}, 1),
    ({"tau": "0", "top_k": "2"}, 2), ({"tau": "1", "mode": "conditional"}, 3),
]


def own_classify_count(service: Proc) -> float:
    """``cpcnn_requests_total`` for /classify as the service's own /metrics shows it now."""
    text = httpx.get(f"{service.base}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == "cpcnn_requests_total" and s.labels.get("endpoint") == "/classify")


def test_prometheus_reads_back_what_the_service_answered(stack: Stack):
    service, prometheus = stack.service, stack.prometheus
    r = httpx.put(f"{service.base}/admin/tau", json={"tau": SERVER_TAU},
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["tau"] == SERVER_TAU

    flops: dict[str, list[tuple[int, int]]] = {"conditional": [], "original": []}
    heads_run: set[int] = set()
    sent = 0
    with httpx.Client(base_url=service.base, timeout=60) as client:
        for i, (params, n_files) in enumerate(REQUESTS):
            files = [("file", (f"r{i}-{j}.png", png(COLORS[(i + j) % len(COLORS)]), "image/png"))
                     for j in range(n_files)]
            r = client.post("/classify", params=params, files=files)
            sent += 1
            assert r.status_code == 200, r.text
            body = r.json()
            mode = params.get("mode", "conditional")
            assert body["mode"] == mode
            expected_tau = (None if mode == "original"
                            else float(params["tau"]) if "tau" in params else SERVER_TAU)
            assert body["tau"] == expected_tau
            assert len(body["results"]) == n_files
            for result in body["results"]:
                flops[mode].append((result["flops"]["total"], result["flops"]["original"]))
                heads_run.update(h["head"] for h in result["heads"] or [])
        # One rejected request: counted under /classify with its status, no images, no FLOPs.
        r = client.post("/classify", params={"tau": "2"},
                        files=[("file", ("bad.png", png((1, 2, 3)), "image/png"))])
        sent += 1
        assert r.status_code == 422, r.text

    cond_total = sum(t for t, _ in flops["conditional"])
    cond_original = sum(o for _, o in flops["conditional"])
    expected_saving = 1 - cond_total / cond_original
    assert heads_run, "no conditional image ran any head"

    # The middleware records a request after its response is sent: wait until the service's own
    # /metrics shows every request, then for a successful scrape that started after that moment.
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while own_classify_count(service) != sent:
        assert time.monotonic() < deadline, "the service never counted every /classify request"
        time.sleep(0.05)
    final_state_at = time.time()

    up_query = f'up{{job="{JOB}"}}'
    last_scrape = None
    while True:
        up = query(prometheus, f"timestamp({up_query}) and {up_query} == 1")
        if up:
            last_scrape = float(up[0]["value"][1])
            if last_scrape > final_state_at + 0.05:  # the scrape started after the final state
                break
        if time.monotonic() > deadline:
            pytest.fail(f"no successful scrape after the last request within "
                        f"{SCRAPE_TIMEOUT_S:.0f} s (last: {last_scrape}, final state at "
                        f"{final_state_at});\ntargets: "
                        f"{httpx.get(f'{prometheus.base}/api/v1/targets', timeout=10).text}\n"
                        f"prometheus log:\n{prometheus.log_tail()}")
        time.sleep(0.2)

    sel = f'job="{JOB}"'
    assert scalar(prometheus, f"{up_query} == 1") == 1.0

    # The request count, all statuses, and the 200s alone.
    assert scalar(prometheus,
                  f'sum(cpcnn_requests_total{{{sel},endpoint="/classify"}})') == sent
    assert scalar(prometheus,
                  f'sum(cpcnn_requests_total{{{sel},endpoint="/classify",status="200"}})') \
        == sent - 1
    assert scalar(prometheus, f'sum(cpcnn_requests_total{{{sel},endpoint="/classify",'
                              f'method="POST",status="422"}})') == 1

    # The FLOP saving, in PromQL from the two counters, against the responses' own FLOPs.
    saving = scalar(prometheus,
                    f'1 - sum(cpcnn_flops_executed_total{{{sel},mode="conditional"}})'
                    f' / sum(cpcnn_original_flops_total{{{sel},mode="conditional"}})')
    assert saving == pytest.approx(expected_saving, rel=1e-9, abs=0)

    # The counters behind it, and the original mode's, exactly (integers well below 2**53).
    for mode, pairs in flops.items():
        assert scalar(prometheus, f'sum(cpcnn_flops_executed_total{{{sel},mode="{mode}"}})') \
            == sum(t for t, _ in pairs)
        assert scalar(prometheus, f'sum(cpcnn_original_flops_total{{{sel},mode="{mode}"}})') \
            == sum(o for _, o in pairs)
        assert scalar(prometheus, f'sum(cpcnn_images_total{{{sel},mode="{mode}"}})') \
            == len(pairs)

    # The τ gauge shows the server's τ, not the per-request τs.
    assert scalar(prometheus, f"cpcnn_tau{{{sel}}}") == SERVER_TAU
    assert scalar(prometheus, f"cpcnn_model_ready{{{sel}}}") == 1.0
