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
Servers and clients live in ``bench/load.py``, the report and its targets in
``bench/serve_report.py``; this file measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import (  # noqa: E402
    MODES,
    InProcess,
    Server,
    drive,
    encode_png,
    machine_info,
    validation_images,
    write_results,
)
from bench.serve_report import markdown, targets  # noqa: E402
from modelpack.backend import RunnerOptions  # noqa: E402
from modelpack.manifest import default_model_dir, load_manifest  # noqa: E402
from modelpack.runner import PackageRunner  # noqa: E402


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
    gpu = "gpu" if result["machine"]["gpu"] else "cpu"
    stem = f"{gpu}{result['machine']['cores']}-{manifest.name}-{manifest.version}"
    if args.tau is not None:  # not the package's default τ: a separate result file
        stem += f"-tau{tau:g}"
    write_results(stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
