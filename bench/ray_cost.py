"""What the Ray Serve application costs on this machine, beside the plain server.

    python bench/ray_cost.py [--model-dir DIR] [--seconds 8] [--rounds 2]

Starts the plain server and the Ray application (``serve run deploy/ray/serve_config.yaml``: a
local Ray, 2 replicas of 1 thread), drives each with the serving bench's closed-loop clients at
concurrency 1 and 32, the two alternating within each round; then times one call through a Serve
deployment handle carrying a trunk feature map (what heads as deployments of their own would pay
per head). Results: ``bench/results/ray-cost-<machine>.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.launch import child_env, wait_until_ready  # noqa: E402
from bench.load import (  # noqa: E402
    Server,
    drive,
    encode_png,
    machine_info,
    stop_process,
    validation_images,
    write_results,
)
from modelpack.manifest import default_model_dir  # noqa: E402

RAY_PORT = 8000  # deploy/ray/serve_config.yaml's http_options.port


class RayApp:
    """``serve run`` of the shipped config as a drive() target."""

    port = RAY_PORT
    settings = {"server": "ray serve, 2 replicas"}

    def __init__(self, model_dir: Path) -> None:
        env = child_env(CPCNN_MODEL_DIR=str(model_dir), RAY_AUTH_MODE="disabled")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run",
                                      "deploy/ray/serve_config.yaml"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        problem = wait_until_ready(f"http://127.0.0.1:{RAY_PORT}/readyz",
                                   alive=lambda: self.proc.poll() is None, timeout=180)
        if problem:
            self.close()
            raise RuntimeError(f"serve run {problem}")

    def close(self) -> None:
        stop_process(self.proc, timeout=60)


def handle_round_trip(batches: tuple[int, ...] = (1, 8), calls: int = 200) -> dict[int, float]:
    """Median ms of one deployment-handle call carrying (N, 64, 16, 16) fp32 features."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Echo:
        def __call__(self, x: np.ndarray) -> np.ndarray:
            return x[:1]

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Caller:
        def __init__(self, echo) -> None:
            self.echo = echo

        async def __call__(self, n: int) -> float:
            x = np.zeros((n, 64, 16, 16), np.float32)
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                await self.echo.remote(x)
                times.append(time.perf_counter() - t0)
            return float(np.median(times[calls // 10:]))

    try:
        handle = serve.run(Caller.bind(Echo.bind()), route_prefix=None)
        return {n: 1e3 * handle.remote(n).result() for n in batches}
    finally:
        serve.shutdown()
        ray.shutdown()


def markdown(result: dict) -> str:
    lines = ["# Ray Serve against the plain server", "",
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['date']}; "
             f"{result['seconds']:g} s a cell, rounds alternating the two.", "",
             "| round | concurrency | server | requests/s | p50 ms | p95 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for r in result["served"]:
        lines.append(f"| {r['round']} | {r['concurrency']} | {r['server']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['errors']} |")
    lines += ["", "One call through a Serve deployment handle with a trunk feature map "
              "(median): " + ", ".join(f"batch {n}: {ms:.2f} ms"
                                       for n, ms in result["handle_ms"].items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()
    bodies = encode_png(validation_images(model_dir, 256))
    result = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": args.seconds, "served": []}
    plain = Server(model_dir, {}, server="plain")
    try:
        ray_app = RayApp(model_dir)
        try:
            for rnd in range(args.rounds):
                for c in (1, 32):
                    for target in (plain, ray_app):
                        row = asyncio.run(drive([(target, "conditional")], bodies, c,
                                                args.seconds))[0]
                        result["served"].append({**row, "round": rnd})
                        print(row)
        finally:
            ray_app.close()
    finally:
        plain.close()
    result["handle_ms"] = handle_round_trip()
    write_results(f"ray-cost-cpu{result['machine']['cores']}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
