"""Does the server keep the cores busy? This tree against an earlier commit, under ``wrk``.

``python bench/cores.py --baseline 56524a7`` (``make bench-cores``) serves the default package
from this tree and from a checkout of the baseline commit (a git worktree in /tmp), both with
their default settings, and drives each with ``wrk`` (C, one thread: it costs the server's cores
far less than a Python client) POSTing PNGs of the package's validation images to ``/classify``.
Rounds are interleaved (every cell of every server once, in a shuffled order, then again), so
both servers share the machine's noise. Per cell: requests per second and p50 from wrk, and the
CPU the server process used (``/proc/PID/stat`` user + system time over the cell's wall time, all
its threads) — "cores busy". Medians over rounds; ratios are this tree over the baseline.

Needs ``wrk`` (Debian: ``apt-get install wrk``) and ``../shared/data`` for the images.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import (  # noqa: E402
    Server,
    encode_png,
    machine_info,
    validation_images,
    write_results,
)
from modelpack.manifest import load_manifest  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# wrk's Lua: one request per pre-encoded PNG, taken in turn.
WRK_SCRIPT = """
local bodies, requests, n = {}, {}, 0
init = function(args)
  for i, path in ipairs(args) do
    local f = io.open(path, "rb"); bodies[i] = f:read("*a"); f:close()
  end
  for i, body in ipairs(bodies) do
    requests[i] = wrk.format("POST", wrk.path, {["Content-Type"] = "image/png"}, body)
  end
end
request = function()
  n = n % #requests + 1
  return requests[n]
end
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def parse_wrk(text: str) -> dict:
    """Requests/s, p50 (ms) and failures from ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    return {"rps": rps, "p50_ms": float(p50.group(1)) * scale,
            "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(0) if errors else ""}


def run_cell(server: Server, concurrency: int, seconds: int, script: Path, bodies: list[Path],
             mode: str) -> dict:
    url = f"{server.base}/classify?mode={mode}"
    before, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    done = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency",
                           "-s", str(script), url, "--", *map(str, bodies)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"wrk failed against {url}: {done.stdout}{done.stderr}")
    out = done.stdout
    wall = time.monotonic() - t0
    cell = parse_wrk(out)
    cell["server_cores"] = (cpu_seconds(server.proc.pid) - before) / wall
    if cell["non_2xx"] or cell["socket_errors"]:
        raise RuntimeError(f"failed requests against {url}:\n{out}")
    return cell


def baseline_tree(commit: str) -> Path:
    """A detached worktree of ``commit`` (made once, reused)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"cpcnn-baseline-{sha}"
    if not (tree / "service").exists():
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT,
                       check=True, capture_output=True)
    return tree


def report(result: dict) -> str:
    base, cells = result["baseline"], result["cells"]
    lines = [f"# Cores busy: this tree ({result['head']}) against {base}", "",
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores; package "
             f"{result['package']}; wrk, one thread; {result['rounds']} interleaved rounds of "
             f"{result['seconds']:g} s per cell; medians. Reproduce: `{result['command']}`.", "",
             "| mode | concurrency | server | req/s | p50 ms | server cores |", "|---|---|---|---|---|---|"]
    for key, by_server in cells.items():
        mode, c = key.split("@")
        for name in ("baseline", "head"):
            m = by_server[name]["median"]
            lines.append(f"| {mode} | {c} | {name} | {m['rps']:.1f} | {m['p50_ms']:.2f} | "
                         f"{m['server_cores']:.2f} |")
        r = by_server["ratio"]
        lines.append(f"| {mode} | {c} | **head / baseline** | **{r['rps']:.3f}×** | "
                     f"{r['p50_ms']:.3f}× | {r['server_cores']:.3f}× |")
    return "\n".join(lines) + "\n"


def setting(text: str) -> tuple[str, str]:
    """One ``--set`` item: ``CPCNN_X=V``."""
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("CPCNN_"):
        raise argparse.ArgumentTypeError(f"expected CPCNN_NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny-imagenet-200")
    parser.add_argument("--baseline", default="56524a7", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="per cell (wrk takes whole seconds)")
    parser.add_argument("--cells", default="conditional@32,conditional@1,original@32")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--set", action="append", default=[], metavar="CPCNN_X=V", type=setting,
                        help="a setting of this tree's server (repeatable; default: none)")
    parser.add_argument("--out", default=None, help="result file stem (default: cores-<package>)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("needs wrk: apt-get install wrk")
    manifest = load_manifest(args.model_dir, verify=False)
    work = Path(tempfile.mkdtemp(prefix="cpcnn-cores-"))
    bodies = []
    for i, png in enumerate(encode_png(validation_images(args.model_dir, args.images))):
        bodies.append(work / f"{i}.png")
        bodies[-1].write_bytes(png)
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    tree = baseline_tree(args.baseline)
    model_rel = args.model_dir.resolve().relative_to(ROOT)
    head_env = dict(args.set)
    servers = {"head": Server(args.model_dir, head_env),
               "baseline": Server(tree / model_rel, {}, tree=tree)}
    cells = [c.split("@") for c in args.cells.split(",")]
    samples: dict[str, dict[str, list[dict]]] = {f"{m}@{c}": {"head": [], "baseline": []}
                                                 for m, c in cells}
    rng = random.Random(0)
    try:
        for round_ in range(args.rounds):
            order = [(name, m, c) for name in servers for m, c in cells]
            rng.shuffle(order)
            for name, mode, c in order:
                cell = run_cell(servers[name], int(c), args.seconds, script, bodies, mode)
                samples[f"{mode}@{c}"][name].append(cell)
                print(f"round {round_ + 1}/{args.rounds} {name:8s} {mode}@{c}: "
                      f"{cell['rps']:.1f} req/s, p50 {cell['p50_ms']:.2f} ms, "
                      f"{cell['server_cores']:.2f} cores", flush=True)
    finally:
        for server in servers.values():
            server.close()
    out: dict[str, dict] = {}
    for key, by_server in samples.items():
        entry: dict[str, dict] = {}
        for name, runs in by_server.items():
            entry[name] = {"runs": runs, "median": {k: statistics.median(r[k] for r in runs)
                                                    for k in ("rps", "p50_ms", "server_cores")}}
        entry["ratio"] = {k: entry["head"]["median"][k] / entry["baseline"]["median"][k]
                          for k in ("rps", "p50_ms", "server_cores")}
        out[key] = entry
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    result = {"machine": machine_info(), "package": f"{manifest.name} {manifest.version}",
              "baseline": args.baseline, "head": head, "rounds": args.rounds,
              "seconds": args.seconds, "head_settings": head_env, "cells": out,
              "command": "python bench/cores.py " + " ".join(argv or sys.argv[1:])}
    write_results(args.out or f"cores-{manifest.name}-{manifest.version}", result, report(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
