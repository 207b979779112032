"""What the serving benches share: servers as child processes, the closed-loop clients that drive
them (``drive``), raw compute as a target beside them (``InProcess``), the machine and the images,
and where results go. Used by ``serve_bench.py``, ``backends.py``, ``tau_control.py`` and ``soak.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.launch import child_env, free_port, wait_until_ready  # noqa: E402
from modelpack.manifest import load_manifest  # noqa: E402
from modelpack.runner import PackageRunner  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODES = ("conditional", "original")
BLOCK_SECONDS = 0.5  # at c=1, how long each server has the client before the next one's turn


# -- the machine ---------------------------------------------------------------------------------
def write_results(stem: str, result: dict, report: str) -> None:
    """``bench/results/<stem>.json`` (every figure) and ``.md`` (the report), and the report on
    stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(report)
    print(report)


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu or None,
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "load_average_before": os.getloadavg()}


# -- images ----------------------------------------------------------------------------------------
def validation_images(model_dir: Path, count: int) -> np.ndarray:
    """``count`` images of the package's own validation split (needs the training extra)."""
    from export.evaluate import validation_split

    images, _ = validation_split(load_manifest(model_dir, verify=False))
    pick = np.random.default_rng(0).choice(len(images), size=min(count, len(images)), replace=False)
    return images[pick]


def encode_png(images: np.ndarray) -> list[bytes]:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# -- a served model ------------------------------------------------------------------------------
class Server:
    """A uvicorn child process serving ``model_dir`` with ``CPCNN_*`` settings ``env``; an idle
    one costs no CPU (ORT threads do not spin), so several can be up at once and be compared
    side by side. ``app``: another ASGI app to serve the same way (the floor); ``tree``: the
    source tree it runs from (another commit's checkout, to compare with)."""

    def __init__(self, model_dir: Path, env: dict[str, str], app: str = "service.app:app",
                 tree: Path = ROOT, **settings: bool) -> None:
        self.settings = settings  # what the result rows record about this server
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full = child_env(CPCNN_MODEL_DIR=str(model_dir), CPCNN_LOG_LEVEL="WARNING", **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port",
             str(self.port), "--no-access-log", "--log-level", "warning"],
            cwd=tree, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        problem = wait_until_ready(f"{self.base}/readyz", alive=lambda: self.proc.poll() is None,
                                   timeout=120)
        if problem:
            self.close()
            raise RuntimeError(f"server {problem}: {self.proc.stderr.read()}")

    def close(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a body, read a Content-Length response.

    The load generator shares the server's two cores, so its own cost per request is part of
    every latency it measures. Round trip of GET /healthz at concurrency 1 on the 2-core machine:
    this client 0.48 ms, aiohttp 0.68 ms, httpx 2.4 ms; a POST /classify costs httpx ~3 ms more
    than this client. So, like wrk, the bench speaks just enough HTTP itself.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                          f"{content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(":", 1) for line in head[1:] if ":" in line)}
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.reader = self.writer = None


class InProcess:
    """Raw compute as a target of ``drive``: the bench's own package runner on the request's image,
    already decoded, with no HTTP, no decoding and no server; the time of the run alone is its
    ``server p50``. Driven at c=1 in turn with the servers, it measures raw compute side by side
    with them, in the same minutes and with the same gaps between runs as a served request has,
    where a tight loop afterwards meets other neighbours and keeps its caches warm from one run
    to the next."""

    port = "in-process"
    settings = {"batching": False, "raw": True}

    def __init__(self, runner: PackageRunner, images: np.ndarray, bodies: list[bytes],
                 tau: float) -> None:
        self.runner, self.tau = runner, tau
        self.images = {body: image[None] for body, image in zip(bodies, images, strict=True)}

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, dict, bytes]:
        image = self.images[body]
        t0 = time.perf_counter()
        if "mode=original" in path:
            result = self.runner.run_original(image)
        else:
            result = self.runner.run(image, self.tau)
        seconds = time.perf_counter() - t0
        flops = result.predictions[0].flops
        payload = json.dumps({"results": [{"flops": {"total": flops.total,
                                                     "saving": flops.saving}}]})
        return 200, {"server-timing": f"total;dur={seconds * 1e3:.3f}"}, payload.encode()

    async def close(self) -> None:
        pass


def server_total_ms(server_timing: str) -> float:
    """``total;dur=…`` of a Server-Timing header (the server's own time for the request)."""
    for part in server_timing.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == "total":
            return float(dur)
    return float("nan")


async def drive(targets: Sequence[tuple[Server | InProcess, str]], bodies: list[bytes],
                concurrency: int, seconds: float,
                block_seconds: float = BLOCK_SECONDS) -> list[dict]:
    """Closed loop: ``concurrency`` clients send one image per request until time is up.

    ``targets`` are (server, mode) pairs; a "server" may be the in-process runner (``InProcess``),
    which answers in the loop itself instead of over a connection. With several, they are measured
    side by side (a noisy neighbour hits them alike), one cell per target, its throughput counted
    over the shared time: the clients take the servers in turn, ``block_seconds`` each, and within a
    block alternate that server's modes request by request in an order drawn anew each round.
    Blocks, because a request that follows one to another server finds that server's model out of
    the CPU caches: alternating over two servers request by request added 0.2-0.85 ms to their
    requests at c=1 (three runs), a cost no server alone pays and raw compute (one process) does not
    show. A new order each round, because in a fixed one the original always came second on its
    server and measured 0.3-0.4 ms faster than the conditional path at c=1 (in a random order,
    0.1-0.5 ms slower).
    """
    cells = [{"latencies": [], "server_ms": [], "flops": [], "savings": [], "errors": 0}
             for _ in targets]
    by_server: dict[int, list[int]] = {}
    for k, (server, _) in enumerate(targets):
        by_server.setdefault(id(server), []).append(k)
    blocks = list(by_server.values())

    async def client(worker: int, stop_at: float, conns: list[Connection | InProcess]) -> None:
        rng = np.random.default_rng(worker)
        i, order, body = worker, [], b""
        started = time.perf_counter()
        while (now := time.perf_counter()) < stop_at:
            if not order:  # a round: the block's targets once, on one image, in a random order
                block = blocks[int((now - started) / block_seconds) % len(blocks)]
                order, body = [block[j] for j in rng.permutation(len(block))], bodies[i % len(bodies)]
                i += concurrency
            k = order.pop()
            cell, path = cells[k], f"/classify?top_k=5&mode={targets[k][1]}"
            t0 = time.perf_counter()
            status, headers, payload = await conns[k].post(path, body, "image/png")
            dt = time.perf_counter() - t0
            if status != 200:
                cell["errors"] += 1
                continue
            cell["latencies"].append(dt)
            cell["server_ms"].append(server_total_ms(headers.get("server-timing", "")))
            f = json.loads(payload)["results"][0]["flops"]
            cell["flops"].append(f["total"])
            cell["savings"].append(f["saving"])

    conns = [[server if isinstance(server, InProcess) else Connection("127.0.0.1", server.port)
              for server, _ in targets] for _ in range(concurrency)]
    try:
        warm_until = time.perf_counter() + min(2.0, seconds / 4)  # warm-up, not recorded
        await asyncio.gather(*(client(w, warm_until, conns[w]) for w in range(concurrency)))
        for cell in cells:
            for values in (cell["latencies"], cell["server_ms"], cell["flops"], cell["savings"]):
                values.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(w, t0 + seconds, conns[w]) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        for conn in (c for per_client in conns for c in per_client):
            await conn.close()
    out = []
    for (server, mode), cell in zip(targets, cells, strict=True):
        if not cell["latencies"]:  # e.g. a cell too short for every server to get its turn
            raise RuntimeError(f"no answered request for {mode} on port {server.port} in {seconds:g} s "
                               f"({cell['errors']} errors); give the bench more --seconds")
        lat = np.array(cell["latencies"])
        out.append({
            **server.settings, "mode": mode, "concurrency": concurrency, "requests": len(lat),
            "errors": cell["errors"], "throughput_rps": len(lat) / elapsed,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p95_ms": 1e3 * float(np.percentile(lat, 95)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "server_p50_ms": float(np.nanmedian(cell["server_ms"])),
            "mean_flops": float(np.mean(cell["flops"])),
            "flop_saving": float(np.mean(cell["savings"])),
            "interleaved": len(targets) > 1})
    return out
