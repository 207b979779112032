"""Serving benchmark: conditional CP-CNN against the original model, served the same way, and
against raw ONNX Runtime compute of the same work in-process.

    python bench/serve_bench.py [--model-dir DIR] [--seconds 10] [--concurrency 1,8,32]

For each server configuration (micro-batching on, then off) it starts a real uvicorn server on
127.0.0.1, warms it up, and drives it with a closed-loop load generator (C concurrent clients, one
image per request, raw ``image/png`` bodies) for a fixed time per (mode, concurrency). At
concurrency 1 the package runner in-process takes its turn with the servers on the same images,
already decoded (the "raw" compute a server at concurrency 1 wraps, measured side by side with
them); afterwards it is timed in a tight loop too, plus the ORT thread settings side by side.
Results go to ``bench/results/<machine>-<package>-<version>.{json,md}`` with the machine they were
measured on.
All figures are medians/percentiles of one run; compare ratios within a file, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import statistics
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

from modelpack.backend import RunnerOptions  # noqa: E402
from modelpack.manifest import default_model_dir, load_manifest  # noqa: E402
from modelpack.runner import PackageRunner  # noqa: E402
from service.launch import child_env, free_port, wait_until_ready  # noqa: E402

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
    from training.evaluate import validation_split

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
    side by side. ``app``: another ASGI app to serve the same way (the floor)."""

    def __init__(self, model_dir: Path, env: dict[str, str], app: str = "service.app:app",
                 **settings: bool) -> None:
        self.settings = settings  # what the result rows record about this server
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full = child_env(CPCNN_MODEL_DIR=str(model_dir), CPCNN_LOG_LEVEL="WARNING", **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port",
             str(self.port), "--no-access-log", "--log-level", "warning"],
            cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        problem = wait_until_ready(f"{self.base}/readyz", alive=lambda: self.proc.poll() is None,
                                   timeout=120)
        if problem:
            self.close()
            raise RuntimeError(f"server {problem}: {self.proc.stderr.read()}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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


# -- raw compute in-process -------------------------------------------------------------------------
def _alternate_modes(runner: PackageRunner, batches: list[np.ndarray], tau: float,
                     repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per batch of the conditional path and the original, alternating batch by batch
    (a noisy neighbour hits both alike), and the conditional runs' seconds per stage."""
    times: dict[str, list[float]] = {"conditional": [], "original": []}
    stages: dict[str, list[float]] = {}
    for _ in range(repeats):
        for batch in batches:
            t0 = time.perf_counter()
            result = runner.run(batch, tau)
            times["conditional"].append(time.perf_counter() - t0)
            for stage, seconds in result.timings.items():
                stages.setdefault(stage, []).append(seconds)
            t0 = time.perf_counter()
            runner.run_original(batch)
            times["original"].append(time.perf_counter() - t0)
    return times, stages


def time_runner(runner: PackageRunner, images: np.ndarray, tau: float,
                repeats: int = 3) -> list[dict]:
    """Median latency of the package runner on single images (no HTTP, no decoding), the
    conditional path and the original alternating image by image."""
    _alternate_modes(runner, [img[None] for img in images[:8]], tau, repeats=1)  # warm-up
    times, _ = _alternate_modes(runner, [img[None] for img in images], tau, repeats)
    return [{"mode": mode, "p50_ms": 1e3 * statistics.median(t),
             "p95_ms": 1e3 * float(np.percentile(t, 95))} for mode, t in times.items()]


def batch_curve(runner: PackageRunner, images: np.ndarray, tau: float,
                sizes: Sequence[int] = (1, 2, 4, 8, 16, 32), repeats: int = 3) -> list[dict]:
    """Conditional against original in-process at each batch size (alternating batch by batch):
    where the FLOP saving becomes time. Each head runs once per batch on its images, so at small
    batches the heads run at batch ~1 with their per-run costs; the trunk's share grows with the
    batch. Stage times are the conditional runs' medians."""
    rows = []
    for size in sizes:
        batches = [images[i:i + size] for i in range(0, len(images) - size + 1, size)]
        times, stages = _alternate_modes(runner, batches, tau, repeats)
        cond, orig = (statistics.median(times[m]) for m in ("conditional", "original"))
        rows.append({"batch": size, "conditional_ms": 1e3 * cond, "original_ms": 1e3 * orig,
                     "ratio": cond / orig,
                     "stages_ms": {k: 1e3 * statistics.median(v) for k, v in stages.items()}})
    return rows


def runner_options(config: dict) -> RunnerOptions:
    """A result row's thread settings (named as the service's settings) as runner options."""
    named = {"intra_op_threads": "threads"}
    return RunnerOptions(**{named.get(k, k): v for k, v in config.items()})


def _time_configs(model_dir: Path, configs: list[dict], images: np.ndarray, tau: float,
                  rounds: int) -> list[dict]:
    """Batch 1 and batch 32 latency of ``configs``, interleaved round by round in one process so
    that a noisy neighbour hits them all alike."""
    runners = [PackageRunner(model_dir, runner_options(c), verify=False) for c in configs]
    single: list[list[float]] = [[] for _ in configs]
    batched: list[list[float]] = [[] for _ in configs]
    batch = images[:32]
    for runner in runners:  # warm-up
        runner.run(batch, tau)
    for rnd in range(rounds):
        for runner, one, many in zip(runners, single, batched, strict=True):
            for img in images[rnd * 16:(rnd + 1) * 16]:
                t0 = time.perf_counter()
                runner.run(img[None], tau)
                one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            runner.run(batch, tau)
            many.append(time.perf_counter() - t0)
    return [{**c, "batch1_p50_ms": 1e3 * statistics.median(one),
             "batch32_ms": 1e3 * statistics.median(many),
             "batch32_images_per_s": len(batch) / statistics.median(many)}
            for c, one, many in zip(configs, single, batched, strict=True)]


def thread_settings(model_dir: Path, images: np.ndarray, tau: float, rounds: int = 6) -> list[dict]:
    """A pool per session: ORT intra-op threads × spinning, and head threads × heads at once.
    Spinning runners are timed alone (their threads keep spinning after a run and would slow
    whatever runs next)."""
    spinning = [{"intra_op_threads": t, "allow_spinning": True, "head_threads": t, "head_workers": 1}
                for t in (1, 2)]
    quiet = [{"intra_op_threads": t, "allow_spinning": False, "head_threads": t, "head_workers": 1}
             for t in (1, 2)]
    quiet += [{"intra_op_threads": 2, "allow_spinning": False, "head_threads": 1, "head_workers": w}
              for w in (1, 2)]
    rows = [row for c in spinning for row in _time_configs(model_dir, [c], images, tau, rounds)]
    rows += _time_configs(model_dir, quiet, images, tau, rounds)
    return [{**row, "pool": "per session"} for row in rows]


def session_costs(model_dir: Path, rounds: int = 5) -> list[dict]:
    """Each kind of ONNX session alone (trunk, clustifier, one head, the original) at batch 1 and
    32 with 1 and 2 intra-op threads, interleaved round by round: what one FLOP costs in time in a
    small session against a large one, i.e. how much of the FLOP saving can become time."""
    from modelpack.ort_backend import session_options

    manifest = load_manifest(model_dir, verify=False)
    parts = {role: c for role, c in manifest.components().items()
             if role in ("trunk", "clustifier", "head0", "original")}
    rng = np.random.default_rng(0)
    cells = []  # (role, threads, batch, session, feed, times)
    for role, comp in parts.items():
        for threads in (1, 2):
            session = ort.InferenceSession(str(model_dir / comp.file),
                                           sess_options=session_options(threads, 1, False),
                                           providers=["CPUExecutionProvider"])
            for batch in (1, 32):
                shape = [batch, *comp.input_shape[1:]]
                feed = {comp.input_name: rng.standard_normal(shape).astype(np.float32)}
                session.run(None, feed)
                cells.append((role, threads, batch, session, feed, []))
    for _ in range(rounds):
        for _role, _threads, batch, session, feed, times in cells:
            for _ in range(40 if batch == 1 else 2):
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - t0)
    out = []
    for role, threads, batch, _session, _feed, times in cells:
        ms = 1e3 * statistics.median(times)
        out.append({"session": role, "threads": threads, "batch": batch, "p50_ms": ms,
                    "mflops_per_image": parts[role].flops / 1e6,
                    "gflops_per_s": parts[role].flops * batch / (ms * 1e6)})
    return out


# -- report ----------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m, lines = result["machine"], []
    lines += [f"# Serving benchmark: {result['package']} {result['version']}", "",
              f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; "
              f"onnxruntime {m['onnxruntime']}; {result['date']}.",
              f"τ = {result['tau']}; {result['seconds']} s per cell; one image (PNG, "
              f"{result['image_size']} px) per request; {result['images']} validation images.", "",
              "Latency is measured by the client (send to last byte); 'server p50' is the server's "
              "own time (`Server-Timing: total`, request body read to response built). ⇄: one "
              "client went over all the c=1 ⇄ rows for half a cell's time per server, three servers "
              "up at once and the raw compute in-process, taking the servers in turn for "
              f"{BLOCK_SECONDS:g} s each and alternating a server's two modes request by request "
              "in a random order (side by side); 'floor': a framework-free ASGI app around the same runner (`bench/floor_app.py`), "
              "what any Python server on this machine pays for the same work; 'raw compute "
              "in-process': the bench's own package runner on the already decoded image, no HTTP, "
              "taking its turn with the servers (its 'server p50' is the run alone, the raw compute "
              "the c=1 targets compare with).",
              "",
              "| batching | mode | concurrency | requests | throughput (req/s) | p50 ms | p95 ms | p99 ms | server p50 ms | mean MFLOPs | FLOP saving |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["served"]:
        batching = "on" if r["batching"] else "off"
        if r.get("raw"):
            batching = "raw compute in-process"
        elif r.get("floor"):
            batching = "floor (bare ASGI)"
        lines.append(f"| {batching} | {r['mode']}{' ⇄' if r.get('interleaved') else ''} | "
                     f"{r['concurrency']} | "
                     f"{r['requests']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_p50_ms']:.2f} | "
                     f"{r['mean_flops'] / 1e6:.2f} | "
                     f"{100 * r['flop_saving']:.1f}% |")
    lines += ["", "Raw compute in-process in a tight loop after the servers (package runner, "
              "batch 1, same images, the modes alternating image by image):", "",
              "| mode | p50 ms | p95 ms |", "|---|---|---|"]
    for r in result["raw"]:
        lines.append(f"| {r['mode']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} |")
    if result.get("batch_sizes"):
        stage_names = list(result["batch_sizes"][0]["stages_ms"])
        lines += ["", "Conditional against original in-process by batch size (package runner, "
                  "median per batch; conditional stages in ms):", "",
                  "| batch | conditional ms | original ms | conditional / original | "
                  + " | ".join(stage_names) + " |",
                  "|---|---|---|---|" + "---|" * len(stage_names)]
        for r in result["batch_sizes"]:
            lines.append(f"| {r['batch']} | {r['conditional_ms']:.2f} | {r['original_ms']:.2f} | "
                         f"{r['ratio']:.2f} | "
                         + " | ".join(f"{r['stages_ms'][k]:.2f}" for k in stage_names) + " |")
    lines += ["", "ONNX Runtime thread settings (in-process, conditional; bench experiments, "
              "not settings: `modelpack.backend.RunnerOptions`):", "",
              "| thread pool | intra-op threads | spinning | head threads | heads at once | batch 1 p50 ms | batch 32 ms | batch 32 images/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["threads"]:
        threads = (f"| per session | {r['intra_op_threads']} | {r['allow_spinning']} | "
                   f"{r.get('head_threads', r['intra_op_threads'])} |")
        lines.append(f"{threads} {r.get('head_workers', 1)} | {r['batch1_p50_ms']:.2f} | "
                     f"{r['batch32_ms']:.1f} | {r['batch32_images_per_s']:.0f} |")
    if result.get("sessions"):
        lines += ["", "Each ONNX session alone (in-process, interleaved; FLOPs from the manifest):", "",
                  "| session | MFLOPs/image | threads | batch 1 ms | batch 1 GFLOP/s | batch 32 ms | batch 32 GFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        rows = {(r["session"], r["threads"], r["batch"]): r for r in result["sessions"]}
        for (name, threads, batch), r in rows.items():
            if batch != 1:
                continue
            big = rows[(name, threads, 32)]
            lines.append(f"| {name} | {r['mflops_per_image']:.1f} | {threads} | {r['p50_ms']:.3f} | "
                         f"{r['gflops_per_s']:.0f} | {big['p50_ms']:.2f} | "
                         f"{big['gflops_per_s']:.0f} |")
        speedup = rows[("trunk", 1, 32)]["p50_ms"] / rows[("trunk", 2, 32)]["p50_ms"]
        if speedup < 1.2:
            lines += ["", f"Warning: the trunk at batch 32 was only {speedup:.2f}× faster on 2 "
                      "threads than on 1: a core was busy elsewhere while the table was measured "
                      "(a shared machine), so other figures of this run may be off too."]
    lines += ["", "Targets (issue 5):", ""]
    for t in result["targets"]:
        lines.append(f"- {'PASS' if t['ok'] else 'FAIL'}: {t['name']}: {t['detail']}")
    return "\n".join(lines) + "\n"


def overhead_room(raw_cond_ms: float, raw_orig_ms: float, saving: float) -> float:
    """The most serving time per request (everything but the model: the socket, HTTP, decoding,
    the framework, the load generator) with which the first c=1 target can still be met, given
    raw compute at batch 1; negative: no server can meet it with this compute.

    Both modes pay the same overhead O: raw_c + O ≤ (1 − 0.8 s)(raw_o + O). Even when compute
    follows the FLOPs exactly (raw_c = (1 − s) raw_o) this is O ≤ raw_o / 4, whatever the saving:
    the target needs a model whose compute dwarfs the cost of serving it.
    """
    bound = 1 - 0.8 * saving
    return (bound * raw_orig_ms - raw_cond_ms) / (1 - bound)


def _room_detail(room: float, overheads: dict[str, float]) -> str:
    spent = ", ".join(f"{name} {ms:.2f} ms" for name, ms in overheads.items())
    if room < 0:
        return (f"this run's raw compute leaves no room for serving at all ({room:.2f} ms): no "
                f"server can meet it with this model on this machine (spent beyond raw compute: "
                f"{spent})")
    return (f"this run's raw compute leaves at most {room:.2f} ms a request for serving (spent "
            f"beyond raw compute: {spent})")


def targets(result: dict) -> list[dict]:
    def cell(batching: bool, mode: str, c: int) -> dict | None:
        return next((r for r in result["served"] if r["batching"] == batching and r["mode"] == mode
                     and r["concurrency"] == c and not r.get("floor") and not r.get("raw")
                     and (c == 1 or not r.get("interleaved"))), None)

    def floor(mode: str) -> dict | None:
        return next((r for r in result["served"] if r.get("floor") and r["mode"] == mode), None)

    def raw_ms(mode: str) -> float:
        """Raw compute at batch 1: side by side with the servers (the in-process row's run time)
        where the run has it, else the tight loop after them (results of earlier benches)."""
        beside = next((r for r in result["served"] if r.get("raw") and r["mode"] == mode), None)
        if beside is not None:
            return beside["server_p50_ms"]
        return next(r for r in result["raw"] if r["mode"] == mode)["p50_ms"]

    out = []
    cond, orig = cell(True, "conditional", 1), cell(True, "original", 1)
    if cond and orig:
        saving = cond["flop_saving"]
        bound = orig["p50_ms"] * (1 - 0.8 * saving)
        floor_cond, floor_orig = floor("conditional"), floor("original")
        detail = (f"{cond['p50_ms']:.2f} ms vs bound {bound:.2f} ms "
                  f"(original {orig['p50_ms']:.2f} ms, saving {100 * saving:.1f}%)")
        if floor_cond and floor_orig:
            detail += (f"; the floor server: {floor_cond['p50_ms']:.2f} ms vs bound "
                       f"{floor_orig['p50_ms'] * (1 - 0.8 * saving):.2f} ms")
        raw, raw_orig = raw_ms("conditional"), raw_ms("original")
        overheads = {"the service": cond["p50_ms"] - raw}
        if floor_cond:
            overheads["the floor"] = floor_cond["p50_ms"] - raw
        room = overhead_room(raw, raw_orig, saving)
        detail += "; " + _room_detail(room, overheads)
        out.append({"name": "conditional p50 ≤ original p50 × (1 − 0.8 × FLOP saving) at c=1",
                    "ok": cond["p50_ms"] <= bound, "detail": detail, "overhead_room_ms": room})
        detail = (f"{cond['p50_ms']:.2f} ms vs raw {raw:.2f} ms = "
                  f"{cond['p50_ms'] / raw:.2f}× (the server's own time, "
                  f"Server-Timing: {cond['server_p50_ms']:.2f} ms = "
                  f"{cond['server_p50_ms'] / raw:.2f}×)")
        loop = next((r for r in result["raw"] if r["mode"] == "conditional"), None)
        if loop is not None and loop["p50_ms"] != raw:
            detail += (f"; against the tight loop's raw {loop['p50_ms']:.2f} ms: "
                       f"{cond['p50_ms'] / loop['p50_ms']:.2f}×")
        if floor_cond:
            detail += (f"; the floor server: {floor_cond['p50_ms']:.2f} ms = "
                       f"{floor_cond['p50_ms'] / raw:.2f}×")
        detail += "; " + _room_detail(0.3 * raw, overheads)
        out.append({"name": "server p50 ≤ 1.3 × raw ORT compute at c=1 (stretch 1.15)",
                    "ok": cond["p50_ms"] <= 1.3 * raw, "detail": detail,
                    "overhead_room_ms": 0.3 * raw})
    c_max = max(result["concurrency"])
    on, off = cell(True, "conditional", c_max), cell(False, "conditional", c_max)
    if on and off:
        ratio = on["throughput_rps"] / off["throughput_rps"]
        out.append({"name": f"throughput at c={c_max}: batching ≥ 1.5 × no batching, p99 ≤ 3 × p50",
                    "ok": ratio >= 1.5 and on["p99_ms"] <= 3 * on["p50_ms"],
                    "detail": f"{on['throughput_rps']:.1f} vs {off['throughput_rps']:.1f} req/s = "
                              f"{ratio:.2f}×; p99/p50 = {on['p99_ms'] / on['p50_ms']:.2f}"})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--tau", type=float, default=None, help="default: the package's")
    parser.add_argument("--max-batch-delay-ms", default="2")
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()
    manifest = load_manifest(model_dir)
    tau = manifest.activator.default_tau if args.tau is None else args.tau
    levels = [int(c) for c in args.concurrency.split(",")]
    images = validation_images(model_dir, args.images)
    bodies = encode_png(images)
    result: dict = {"package": manifest.name, "version": manifest.version, "tau": tau,
                    "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "seconds": args.seconds, "concurrency": levels, "images": len(images),
                    "image_size": manifest.input.size, "served": []}
    # Three servers up at once: the default (batching on), batching off, and the framework-free
    # floor around the same runner (bench/floor_app.py). At c=1 one client goes over all (server, mode) pairs and
    # the raw compute in-process (``InProcess``; the servers and it in turns of BLOCK_SECONDS, a
    # server's modes request by request), so the c=1 figures the targets compare are measured
    # side by side; at higher concurrency each (server, mode) has the machine alone.
    runner = PackageRunner(model_dir, verify=False)  # raw compute, with the servers' settings
    servers: list[Server] = []
    try:
        for batching in (True, False):
            servers.append(Server(
                model_dir, {"CPCNN_BATCHING": str(batching).lower(), "CPCNN_TAU": str(tau),
                            "CPCNN_MAX_BATCH_DELAY_MS": args.max_batch_delay_ms},
                batching=batching))
        # The floor: no framework, the same runner (bench/floor_app.py), only at c=1.
        floor = Server(model_dir, {"CPCNN_TAU": str(tau)}, app="bench.floor_app:app",
                       batching=False, floor=True)
        servers.append(floor)
        for c in levels:
            if c == 1:  # raw compute in-process takes its turn with the servers
                in_process = InProcess(runner, images, bodies, tau)
                runs = [[(server, mode) for server in (*servers, in_process) for mode in MODES]]
            else:  # the floor: for a request alone
                runs = [[(server, mode)] for server in servers[:2] for mode in MODES]
            for targets_ in runs:  # side by side at c=1: half a cell's time per server
                seconds = args.seconds * (max(1, len(targets_) / 4) if c == 1 else len(targets_))
                for r in asyncio.run(drive(targets_, bodies, c, seconds)):
                    print(json.dumps(r))
                    result["served"].append(r)
    finally:
        for server in servers:
            server.close()
    result["raw"] = time_runner(runner, images, tau)
    result["batch_sizes"] = batch_curve(runner, images, tau)
    result["threads"] = thread_settings(model_dir, images, tau)
    result["sessions"] = session_costs(model_dir)
    result["targets"] = targets(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    gpu = "gpu" if result["machine"]["gpu"] else "cpu"
    stem = f"{gpu}{result['machine']['cores']}-{manifest.name}-{manifest.version}"
    if args.tau is not None:  # not the package's default τ: a separate result file
        stem += f"-tau{tau:g}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
