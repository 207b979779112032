"""Soak and chaos: thousands of requests against a real server while τ changes and packages reload.

    python bench/soak.py [--model-dir DIR] [--requests 30000] [--concurrency 8] [--max-seconds 900]

Starts ``python -m service`` on 127.0.0.1 (loopback only) with a temporary models root holding two
copies of the package (versions ``<v>-soak-a`` and ``<v>-soak-b``). Closed-loop clients send
classify requests (1-4 images, raw or multipart, conditional or original mode, some with their
own τ) and a share of hostile ones (garbage, truncated, oversized, bad parameters) that must
answer 4xx. Meanwhile an operator task changes τ (``PUT /admin/tau``) and another reloads the
other copy (``POST /admin/reload``) on a timer. Bounded by ``--requests`` and ``--max-seconds``.

Reported: failed requests (a transport error, a 5xx, a good request not answered 200, a hostile
one not answered 4xx, a 200 from neither package; target 0), 5xx (target 0), the server's resident
memory (VmRSS) after warm-up (both packages loaded once), at the end and at its peak, its growth
over the soak (target < 10 %), and its open file descriptors at start and end. Then SIGTERM: the
exit status is reported too. Between the two, a burst (``bench/overload.py``): 200 requests of
4 x 3 MP PNGs at once against ``CPCNN_MAX_IN_FLIGHT=32``, each answered 200 or a fast 503 with
Retry-After; and the SIGTERM comes while an upload is stalled mid-body, so the stop must end
within the grace period. Results: ``bench/results/soak-<machine>.{json,md}``.

Growth compares the median of the RSS samples (every 0.5 s) in the last fifth of the soak with
the median in its second fifth; the first fifth is left to settle. A leak grows with the
requests, while a single sample swings by tens of MiB with the moment of a reload (two packages
are loaded while one is swapped in), and the allocator's plateau under the soak's load is only
reached a minute or two into it. Measured against the single sample after warm-up, the same
server read +25 % in one run and +2 % in the next. With this measure, 50 s soaks read +12.7 % and
+6.5 %, a 247 s one +3.9 % and a 600 s one +1.7 %, its medians by tenth on a plateau of
323-339 MiB after the first two minutes: hence the default of 30,000 requests (~4 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.launch import child_env, free_port, wait_until_ready  # noqa: E402
from bench.load import machine_info  # noqa: E402
from bench.overload import burst, stall_upload  # noqa: E402
from modelpack.manifest import (  # noqa: E402
    copy_package,
    default_model_dir,  # noqa: E402
    load_manifest,
)

RESULTS = ROOT / "bench" / "results"


GRACE_S = 5  # the server's shutdown grace in the soak (CPCNN_SHUTDOWN_GRACE_S)


# -- the server process ----------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and open file descriptors of ``pid``, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def start_server(models_root: Path, port: int, token: str) -> subprocess.Popen:
    env = child_env(CPCNN_MODEL_DIR=str(models_root / "a"), CPCNN_MODELS_ROOT=str(models_root),
                    CPCNN_ADMIN_TOKEN=token, CPCNN_HOST="127.0.0.1", CPCNN_PORT=str(port),
                    CPCNN_LOG_LEVEL="WARNING", CPCNN_SHUTDOWN_GRACE_S=str(GRACE_S),
                    CPCNN_MAX_IN_FLIGHT="32")
    return subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 180) -> None:
    problem = wait_until_ready(f"{base}/readyz", alive=lambda: proc.poll() is None,
                               timeout=timeout)
    if problem:
        raise SystemExit(f"server {problem} (exit code {proc.poll()}):\n"
                         f"{proc.stdout.read() if proc.poll() is not None else ''}")


# -- requests --------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def image_pool(rng: random.Random, count: int = 24) -> list[tuple[bytes, str]]:
    out = []
    for _ in range(count):
        w, h = rng.randint(16, 320), rng.randint(16, 320)
        arr = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (h, w, 3), np.uint8)
        fmt = rng.choice(["PNG", "JPEG", "WEBP", "GIF"])
        out.append((encode(Image.fromarray(arr), fmt), f"image/{fmt.lower()}"))
    return out


def hostile_pool(limit_pixels: int = 40_000_000) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) of requests that must answer 4xx."""
    png = encode(Image.new("RGB", (64, 64), (10, 200, 30)), "PNG")
    bomb = encode(Image.new("L", (8000, 6000)), "PNG")  # 48 MP of zeros: a few KB
    return [
        ("garbage", {"content": b"not an image", "headers": {"Content-Type": "image/png"}}),
        ("truncated", {"content": png[: len(png) // 2], "headers": {"Content-Type": "image/png"}}),
        ("empty", {"content": b"", "headers": {"Content-Type": "image/png"}}),
        ("pixel-bomb", {"content": bomb, "headers": {"Content-Type": "image/png"}}),
        ("oversized", {"content": b"\0" * (11 * 1024 * 1024),
                       "headers": {"Content-Type": "image/png"}}),
        ("too-many-files", {"files": [("file", (f"{i}.png", png, "image/png"))
                                      for i in range(17)]}),
        ("bad-tau", {"content": png, "headers": {"Content-Type": "image/png"},
                     "params": {"tau": "nan"}}),
        ("bad-top-k", {"content": png, "headers": {"Content-Type": "image/png"},
                       "params": {"top_k": "-1"}}),
        ("wrong-type", {"content": png, "headers": {"Content-Type": "text/plain"}}),
    ]


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    hostile_refused: int = 0
    failed: int = 0
    server_errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    reloads_ok: int = 0
    reloads_failed: int = 0
    tau_changes: int = 0
    admin_failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(what)


async def client_loop(client: httpx.AsyncClient, tally: Tally, budget: list[int], deadline: float,
                      rng: random.Random, images: list, hostile: list, hostile_share: float,
                      versions: set[str]) -> None:
    while budget[0] > 0 and time.monotonic() < deadline:
        budget[0] -= 1
        tally.sent += 1
        bad = rng.random() < hostile_share
        if bad:
            name, kwargs = rng.choice(hostile)
        else:
            name, params = "classify", {"top_k": rng.choice([1, 3, 5, 1000])}
            if rng.random() < 0.3:
                params["tau"] = round(rng.random(), 3)
            if rng.random() < 0.15:
                params["mode"] = "original"
            picks = rng.sample(images, rng.randint(1, 4))
            if len(picks) == 1 and rng.random() < 0.5:
                data, ctype = picks[0]
                kwargs = {"content": data, "headers": {"Content-Type": ctype}, "params": params}
            else:
                kwargs = {"files": [("file", (f"{i}", d, c)) for i, (d, c) in enumerate(picks)],
                          "params": params}
        t0 = time.perf_counter()
        try:
            r = await client.post("/classify", **kwargs)
        except httpx.HTTPError as e:
            tally.fail(f"{name}: {type(e).__name__}: {e}")
            continue
        tally.latencies.append(time.perf_counter() - t0)
        tally.statuses[str(r.status_code)] = tally.statuses.get(str(r.status_code), 0) + 1
        if r.status_code >= 500:
            tally.server_errors += 1
            tally.fail(f"{name}: {r.status_code} {r.text[:200]}")
        elif bad:
            if 400 <= r.status_code < 500:
                tally.hostile_refused += 1
            else:
                tally.fail(f"{name}: expected 4xx, got {r.status_code}")
        elif r.status_code != 200:
            tally.fail(f"{name}: {r.status_code} {r.text[:200]}")
        else:
            version = r.json()["model"]["version"]
            tally.versions[version] = tally.versions.get(version, 0) + 1
            if version not in versions:
                tally.fail(f"answered by unknown package version {version}")
            else:
                tally.ok += 1


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True: go on."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return True
    return False


async def tau_loop(client: httpx.AsyncClient, tally: Tally, auth: dict, stop: asyncio.Event,
                   rng: random.Random, every: float) -> None:
    while await pause(stop, every):
        r = await client.put("/admin/tau", json={"tau": round(rng.random(), 3)}, headers=auth)
        if r.status_code == 200:
            tally.tau_changes += 1
        else:
            tally.admin_failures.append(f"PUT /admin/tau: {r.status_code} {r.text[:200]}")


async def reload_loop(client: httpx.AsyncClient, tally: Tally, auth: dict, stop: asyncio.Event,
                      every: float, first: str = "b") -> None:
    package = first
    while await pause(stop, every):
        r = await client.post("/admin/reload", json={"package": package}, headers=auth,
                              timeout=120)
        if r.status_code == 200:
            tally.reloads_ok += 1
            package = "a" if package == "b" else "b"
        else:
            tally.reloads_failed += 1
            tally.admin_failures.append(f"POST /admin/reload: {r.status_code} {r.text[:200]}")


async def phase(base: str, token: str, requests: int, seconds: float, args: argparse.Namespace,
                versions: set[str], tally: Tally, rng: random.Random, images: list,
                hostile: list, sample: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        stop = asyncio.Event()
        chaos = [asyncio.create_task(tau_loop(client, tally, auth, stop, rng, args.tau_every)),
                 asyncio.create_task(reload_loop(client, tally, auth, stop, args.reload_every))]
        sampler = asyncio.create_task(sample(stop))
        budget = [requests]
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(client, tally, budget, deadline, rng, images, hostile,
                                           args.hostile_share, versions)
                               for _ in range(args.concurrency)))
        stop.set()
        await asyncio.gather(*chaos, sampler)


# -- report ----------------------------------------------------------------------------------------
def rss_growth(samples: list[int]) -> tuple[float, float, float]:
    """(early, late, growth): medians of the second and the last fifth of ``samples`` (in
    order; with fewer than 10, of the first and last fifth) and late / early − 1."""
    if not samples:
        return float("nan"), float("nan"), float("nan")
    k = max(1, len(samples) // 5)
    window = samples[k:2 * k] if len(samples) >= 10 else samples[:k]
    early, late = statistics.median(window), statistics.median(samples[-k:])
    return early, late, late / early - 1


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def markdown(result: dict) -> str:
    t, m, p = result["totals"], result["machine"], result["process"]
    rows = [
        ("requests sent", t["sent"]), ("answered 200 (good requests)", t["ok"]),
        ("hostile requests refused with 4xx", t["hostile_refused"]),
        ("**failed requests** (target 0)", t["failed"]), ("**5xx** (target 0)", t["server_errors"]),
        ("status counts", ", ".join(f"{k}: {v}" for k, v in sorted(t["statuses"].items()))),
        ("answers by package version", ", ".join(f"{k}: {v}" for k, v in
                                                 sorted(t["versions"].items()))),
        ("reloads ok / failed", f"{t['reloads_ok']} / {t['reloads_failed']}"),
        ("τ changes", t["tau_changes"]),
        ("latency p50 / p95 / p99 (ms)", " / ".join(f"{result['latency_ms'][k]:.1f}"
                                                   for k in ("p50", "p95", "p99"))),
        ("throughput (requests/s)", f"{result['throughput_rps']:.1f}"),
        ("RSS after warm-up / end / peak (MiB)",
         f"{p['rss_warm_kib'] / 1024:.1f} / {p['rss_end_kib'] / 1024:.1f} / "
         f"{p['rss_peak_kib'] / 1024:.1f}"),
        ("RSS median of the soak's second / last fifth (MiB)",
         f"{p['rss_early_kib'] / 1024:.1f} / {p['rss_late_kib'] / 1024:.1f} "
         f"({p['rss_samples']} samples)"),
        ("**RSS growth over the soak** (target < 10 %)", f"{p['rss_growth'] * 100:+.1f} %"),
        ("open fds at start / end", f"{p['fds_start']} / {p['fds_end']}"),
        ("burst: answers by status (target: only 200 and 503)",
         ", ".join(f"{k}: {v}" for k, v in result["burst"]["statuses"].items())),
        ("burst: seconds; 503 p50 / 200 p50 (ms)",
         f"{result['burst']['seconds']:.1f}; {result['burst']['refusal_p50_ms'] or 0:.0f} / "
         f"{result['burst']['ok_p50_ms'] or 0:.0f}"),
        ("burst: RSS before / peak / 5 s after (MiB)",
         " / ".join(f"{result['burst'][k] / 1024:.0f}"
                    for k in ("rss_before_kib", "rss_peak_kib", "rss_after_kib"))),
        ("burst: a plain request 5 s after (ms)", f"{result['burst']['probe_ms']:.0f}"),
        ("exit status after SIGTERM", p["exit_status"]),
        ("seconds from SIGTERM to exit, an upload stalled (target < grace + 10 s)",
         f"{result['stop_seconds_with_stalled_upload']:.1f}"),
        ("duration (s), warm-up + soak", f"{result['warmup_seconds']:.1f} + "
                                          f"{result['soak_seconds']:.1f}"),
    ]
    lines = [f"# Soak: {result['package']} on {m['cpu']} ({m['cores']} cores)", "",
             f"{result['date']}; up to {result['config']['requests']} requests or "
             f"{result['config']['max_seconds']:g} s, concurrency "
             f"{result['config']['concurrency']}, hostile share {result['config']['hostile_share']}, "
             f"τ change every {result['config']['tau_every']} s, reload every "
             f"{result['config']['reload_every']} s. Verdict: **{result['verdict']}**.", "",
             "| What | Value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if t["failures"] or t["admin_failures"]:
        lines += ["", "First failures:", ""] + [f"- `{f}`" for f in
                                                 t["failures"] + t["admin_failures"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument("--warmup-requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--hostile-share", type=float, default=0.1)
    parser.add_argument("--tau-every", type=float, default=0.25, help="seconds between τ changes")
    parser.add_argument("--reload-every", type=float, default=2.0, help="seconds between reloads")
    parser.add_argument("--max-seconds", type=float, default=900, help="bound on the soak phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--burst-clients", type=int, default=200,
                        help="requests of 4 x 3 MP PNGs sent at once after the soak")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    manifest = load_manifest(args.model_dir, verify=False)
    versions = {f"{manifest.version}-soak-a", f"{manifest.version}-soak-b"}
    images, hostile = image_pool(rng), hostile_pool()
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="cpcnn-soak-") as tmp:
        models_root = Path(tmp)
        for name in ("a", "b"):
            copy_package(args.model_dir, models_root / name, version=f"{manifest.version}-soak-{name}")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(models_root, port, token)
        try:
            wait_ready(proc, base)
            peak, samples = [0], []  # RSS (KiB): the highest, and every sample of the soak

            async def sample(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    rss = proc_status(proc.pid)["rss_kib"]
                    peak[0] = max(peak[0], rss)
                    samples.append(rss)
                    await asyncio.sleep(0.5)

            # 1. warm-up: every path and both packages once (a reload each way), not measured
            warm = Tally()
            t0 = time.perf_counter()
            warm_args = argparse.Namespace(**{**vars(args), "reload_every": 0.5})
            asyncio.run(phase(base, token, args.warmup_requests, args.max_seconds, warm_args,
                              versions, warm, rng, images, hostile, sample))
            warmup_seconds = time.perf_counter() - t0
            if warm.reloads_ok < 2:
                print(f"warning: only {warm.reloads_ok} reloads during warm-up", file=sys.stderr)
            start = proc_status(proc.pid)
            peak[0] = start["rss_kib"]
            samples.clear()  # the warm-up's samples do not count towards growth
            print(f"warm-up done: {warm.sent} requests, {warm.reloads_ok} reloads, RSS "
                  f"{start['rss_kib'] / 1024:.1f} MiB, {start['fds']} fds")
            # 2. the soak
            tally = Tally()
            t0 = time.perf_counter()
            asyncio.run(phase(base, token, args.requests, args.max_seconds, args, versions,
                              tally, rng, images, hostile, sample))
            soak_seconds = time.perf_counter() - t0
            end = proc_status(proc.pid)
            peak[0] = max(peak[0], end["rss_kib"])
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            server_5xx = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                             if line.startswith("cpcnn_requests_total") and 'status="5' in line)
            # 3. a burst far past the admission bounds: 200s and fast 503s, memory given back
            overload = asyncio.run(burst(base, lambda: proc_status(proc.pid)["rss_kib"],
                                         clients=args.burst_clients))
            print(f"burst: {overload['statuses']} in {overload['seconds']:.1f} s, RSS peak "
                  f"{overload['rss_peak_kib'] / 1024:.0f} MiB, after "
                  f"{overload['rss_after_kib'] / 1024:.0f} MiB")
            # 4. a graceful stop with an upload stalled mid-body
            stalled = stall_upload(port)
            time.sleep(0.5)
            t_stop = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            exit_status = proc.wait(timeout=120)
            stop_seconds = time.perf_counter() - t_stop
            stalled.close()
        finally:
            if proc.poll() is None:
                proc.kill()
            log = proc.communicate()[0] if proc.stdout else ""
    t = tally
    early, late, growth = rss_growth(samples)
    lat = [x * 1000 for x in t.latencies]
    verdict = "pass" if (t.failed == 0 and t.server_errors == 0 and server_5xx == 0
                         and growth < 0.10 and not t.admin_failures and exit_status == 0
                         and overload["ok"] and stop_seconds < GRACE_S + 10) else "FAIL"
    m = machine_info()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": m,
        "package": f"{manifest.name} {manifest.version}", "verdict": verdict,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "totals": {**{k: v for k, v in vars(t).items() if k != "latencies"},
                   "server_5xx_from_metrics": server_5xx},
        "latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95),
                       "p99": percentile(lat, 99), "mean": statistics.fmean(lat) if lat else 0},
        "throughput_rps": t.sent / soak_seconds,
        "process": {"rss_warm_kib": start["rss_kib"], "rss_end_kib": end["rss_kib"],
                    "rss_peak_kib": peak[0], "rss_early_kib": early, "rss_late_kib": late,
                    "rss_samples": len(samples), "rss_growth": growth,
                    "rss_samples_kib": samples, "fds_start": start["fds"],
                    "fds_end": end["fds"], "exit_status": exit_status},
        "burst": overload, "stop_seconds_with_stalled_upload": stop_seconds,
        "warmup": {"requests": warm.sent, "failed": warm.failed, "reloads_ok": warm.reloads_ok},
        "warmup_seconds": warmup_seconds, "soak_seconds": soak_seconds,
        "server_log_tail": log[-4000:],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"soak-{'gpu' if m['gpu'] else 'cpu'}{m['cores']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    (RESULTS / f"{stem}.md").write_text(report)
    print(report)
    print(f"wrote {RESULTS / stem}.json and .md")
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
