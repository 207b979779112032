"""τ over time under a load step: the τ controller holding a p95 latency target on loopback.

One real server (``uvicorn service.app:app``) on the default package; closed-loop clients on
127.0.0.1. The run:

1. **Calibration** at the high load: p95 of the server's own request time (Server-Timing
   ``total``) with τ pinned at ``--tau-min`` and at ``--tau-max``, interleaved. The target is set
   between the two (``--target-fraction``), so it is reachable under the high load on whatever
   machine runs this, and the low load meets it with room to spare.
2. **The step**: the controller starts at ``--tau-max``; ``--low`` clients for a third of
   ``--seconds``, ``--high`` for a third, ``--low`` again. Every 0.5 s the bench reads
   ``GET /admin/tau/controller``; per second it records the client-side p95.

Writes ``bench/results/tau-control-<machine>.{json,md,png}``; the plot is what README.md shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import (  # noqa: E402
    RESULTS,
    Connection,
    Server,
    encode_png,
    machine_info,
    server_total_ms,
    validation_images,
)
from modelpack.manifest import default_model_dir, load_manifest  # noqa: E402

logger = logging.getLogger("bench.tau_control")
TOKEN = "bench-tau-control"


def admin(server: Server, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"{server.base}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Load:
    """Closed-loop clients whose number can change while they run; records (time, server ms)."""

    def __init__(self, server: Server, bodies: list[bytes]) -> None:
        self.server, self.bodies = server, bodies
        self.samples: list[tuple[float, float]] = []
        self.failures = 0
        self._tasks: list[asyncio.Task] = []

    async def _client(self, k: int) -> None:
        conn = Connection("127.0.0.1", self.server.port)
        i = k
        try:
            while True:
                status, headers, _ = await conn.post("/classify", self.bodies[i % len(self.bodies)],
                                                     "image/png")
                i += 7
                if status != 200:
                    self.failures += 1
                    continue
                self.samples.append((time.monotonic(),
                                     server_total_ms(headers.get("server-timing", ""))))
        finally:
            await conn.close()

    def set_clients(self, n: int) -> None:
        while len(self._tasks) < n:
            self._tasks.append(asyncio.create_task(self._client(len(self._tasks))))
        while len(self._tasks) > n:
            self._tasks.pop().cancel()

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def calibrate(server: Server, load: Load, clients: int, taus: tuple[float, float],
                    seconds: float, rounds: int) -> dict[float, float]:
    """p95 server ms at each τ under ``clients``, interleaved over ``rounds``; medians."""
    load.set_clients(clients)
    per_tau: dict[float, list[float]] = {t: [] for t in taus}
    for r in range(rounds):
        for tau in taus if r % 2 == 0 else taus[::-1]:
            admin(server, "PUT", "/admin/tau", {"tau": tau})
            await asyncio.sleep(0.5)  # requests that started before the change drain
            start = time.monotonic()
            await asyncio.sleep(seconds)
            ms = [m for t, m in load.samples if t >= start]
            per_tau[tau].append(float(np.percentile(ms, 95)))
            logger.info("calibration round %d: tau %.2f p95 %.2f ms (%d requests)", r + 1, tau,
                        per_tau[tau][-1], len(ms))
    await load.stop()
    await asyncio.sleep(1.0)  # requests still queued in the server finish before the step starts
    return {tau: statistics.median(v) for tau, v in per_tau.items()}


async def step(server: Server, load: Load, config: dict, low: int, high: int,
               seconds: float) -> list[dict]:
    """Start the controller, run low → high → low, and sample its state every 0.5 s."""
    load.samples.clear()
    admin(server, "PUT", "/admin/tau", {"tau": config["tau_max"]})
    admin(server, "PUT", "/admin/tau/controller", config)
    t0 = time.monotonic()
    series, phase = [], -1
    while (now := time.monotonic() - t0) < seconds:
        wanted = 1 if seconds / 3 <= now < 2 * seconds / 3 else (0 if now < seconds / 3 else 2)
        if wanted != phase:
            phase = wanted
            load.set_clients(high if phase == 1 else low)
            logger.info("t=%.0f s: %d clients", now, high if phase == 1 else low)
        state = await asyncio.to_thread(admin, server, "GET", "/admin/tau/controller")
        series.append({"t": now, "clients": high if phase == 1 else low, "tau": state["tau"],
                       "state": state["state"], "measured_ms": (state.get("measured") or
                                                                float("nan")) * 1000})
        await asyncio.sleep(0.5)
    await load.stop()
    admin(server, "DELETE", "/admin/tau/controller")
    return series


def client_p95_per_second(samples: list[tuple[float, float]], t0: float) -> list[dict]:
    by_second: dict[int, list[float]] = {}
    for t, ms in samples:
        by_second.setdefault(int(t - t0), []).append(ms)
    return [{"t": s + 0.5, "p95_ms": float(np.percentile(v, 95)), "requests": len(v)}
            for s, v in sorted(by_second.items()) if len(v) >= 5]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, target = result["series"], result["config"]["p95_ms"]
    t = [s["t"] for s in series]
    fig, (ax_tau, ax_ms) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    third = result["seconds"] / 3
    for ax in (ax_tau, ax_ms):
        ax.axvspan(third, 2 * third, color="0.92", label=f"{result['high']} clients")
    ax_tau.step(t, [s["tau"] for s in series], where="post", color="C0")
    ax_tau.axhline(result["config"]["tau_min"], color="0.5", ls=":", lw=1)
    ax_tau.axhline(result["config"]["tau_max"], color="0.5", ls=":", lw=1)
    ax_tau.set_ylabel("τ")
    ax_tau.legend(loc="upper right", fontsize=8)
    ax_tau.set_title(f"τ controller under a load step ({result['low']} → {result['high']} → "
                     f"{result['low']} clients), {result['package']}")
    per_s = result["client_p95_per_second"]
    ax_ms.plot([p["t"] for p in per_s], [p["p95_ms"] for p in per_s], color="C1", lw=1,
               label="p95 per second (Server-Timing total)")
    ax_ms.plot(t, [s["measured_ms"] for s in series], color="C2", lw=1.5,
               label=f"controller's window p95 ({result['config']['window_s']:g} s)")
    ax_ms.axhline(target, color="C3", ls="--", lw=1, label=f"target {target:.1f} ms")
    ax_ms.set_ylabel("ms")
    ax_ms.set_xlabel("seconds")
    ax_ms.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> dict:
    """Per phase: τ and p95 over the last half of the phase (after it had time to settle)."""
    third, out = result["seconds"] / 3, {}
    for name, (a, b) in {"low": (0, third), "high": (third, 2 * third),
                         "low again": (2 * third, 3 * third)}.items():
        settled = a + (b - a) / 2
        taus = [s["tau"] for s in result["series"] if settled <= s["t"] < b]
        p95 = [p["p95_ms"] for p in result["client_p95_per_second"] if settled <= p["t"] < b]
        changes = sum(1 for x, y in zip(taus, taus[1:], strict=False) if x != y)
        out[name] = {"tau_median": statistics.median(taus), "tau_min": min(taus),
                     "tau_max": max(taus), "tau_changes": changes,
                     "p95_ms_median": statistics.median(p95)}
    return out


def markdown(result: dict) -> str:
    c, cal = result["config"], result["calibration_p95_ms"]
    lines = [f"# τ controller under a load step — {result['package']}", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. "
             f"`python bench/tau_control.py {result['args']}`.", "",
             f"Calibration at {result['high']} clients (p95 of Server-Timing total, medians of "
             f"{result['rounds']} interleaved rounds): τ {c['tau_min']:g} → "
             f"{cal[str(c['tau_min'])]:.2f} ms, τ {c['tau_max']:g} → "
             f"{cal[str(c['tau_max'])]:.2f} ms; target p95 {c['p95_ms']:.2f} ms, "
             f"window {c['window_s']:g} s.", "",
             "| phase | clients | τ (median, settled half) | τ range | τ changes | p95 ms (median of "
             "per-second p95s) |", "|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        clients = result["high"] if name == "high" else result["low"]
        lines.append(f"| {name} | {clients} | {s['tau_median']:.3f} | {s['tau_min']:.3f}–"
                     f"{s['tau_max']:.3f} | {s['tau_changes']} | {s['p95_ms_median']:.2f} |")
    lines += ["", f"Requests answered: {result['requests']}; failures: {result['failures']}.", "",
              f"![τ over time]({Path(result['plot']).name})", ""]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict:
    model_dir = Path(args.model_dir)
    manifest = load_manifest(model_dir, verify=False)
    try:
        images = validation_images(model_dir, 256)
    except (ImportError, OSError, ValueError) as e:  # no dataset here: noise images
        logger.warning("no validation images (%s): random images instead", e)
        side = manifest.input.size
        images = np.random.default_rng(0).integers(0, 256, (256, side, side, 3), dtype=np.uint8)
    bodies = encode_png(images)
    server = Server(model_dir, {"CPCNN_ADMIN_TOKEN": TOKEN})
    try:
        load = Load(server, bodies)
        cal = await calibrate(server, load, args.high, (args.tau_min, args.tau_max),
                              args.calibration_seconds, args.rounds)
        target = cal[args.tau_min] + args.target_fraction * (cal[args.tau_max] - cal[args.tau_min])
        config = {"p95_ms": round(target, 3), "tau_min": args.tau_min, "tau_max": args.tau_max,
                  "window_s": args.window_s}
        logger.info("target p95 %.2f ms; load step %d → %d → %d clients over %g s", target,
                    args.low, args.high, args.low, args.seconds)
        t0 = time.monotonic()
        series = await step(server, load, config, args.low, args.high, args.seconds)
        result = {"package": f"{manifest.name} {manifest.version}", "machine": machine_info(),
                  "args": " ".join(sys.argv[1:]), "config": config, "low": args.low,
                  "high": args.high, "seconds": args.seconds, "rounds": args.rounds,
                  "calibration_p95_ms": {str(k): v for k, v in cal.items()}, "series": series,
                  "client_p95_per_second": client_p95_per_second(load.samples, t0),
                  "requests": len(load.samples), "failures": load.failures}
    finally:
        server.close()
    result["summary"] = summary(result)
    return result


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--low", type=int, default=2, help="clients before and after the step")
    p.add_argument("--high", type=int, default=12, help="clients during the step")
    p.add_argument("--seconds", type=float, default=150.0, help="the three phases together")
    p.add_argument("--window-s", type=float, default=2.0, help="the controller's window")
    p.add_argument("--tau-min", type=float, default=0.3)
    p.add_argument("--tau-max", type=float, default=0.95)
    p.add_argument("--target-fraction", type=float, default=0.5,
                   help="where the target lies between the calibrated p95 at tau-min and tau-max")
    p.add_argument("--calibration-seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="", help="results stem (default bench/results/tau-control-"
                   "<cpu|gpu><cores>)")
    args = p.parse_args()
    result = asyncio.run(run(args))
    machine = result["machine"]
    stem = Path(args.out) if args.out else RESULTS / (
        f"tau-control-{'gpu' if machine['gpu'] else 'cpu'}{machine['cores']}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(stem.with_suffix(".png"))
    plot(result, stem.with_suffix(".png"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
