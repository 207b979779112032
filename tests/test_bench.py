"""The benchmark's own logic: the floor server answers what the runner computes, and the targets
are judged on the service's cells, never on the floor's (timings themselves are not tested)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench import floor_app
from bench.load import InProcess, drive, encode_png
from bench.serve_bench import batch_curve
from bench.serve_report import overhead_room, targets
from modelpack.runner import PackageRunner
from tests.conftest import SHIPPED_PACKAGE


@pytest.mark.parametrize("mode", ["conditional", "original"])
def test_floor_server_answers_the_runners_prediction(monkeypatch, mode):
    monkeypatch.setenv("CPCNN_MODEL_DIR", str(SHIPPED_PACKAGE))
    monkeypatch.delenv("CPCNN_TAU", raising=False)
    runner = PackageRunner(SHIPPED_PACKAGE, verify=False)
    size = runner.manifest.input.size
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    with TestClient(floor_app.app) as client:
        assert client.get("/readyz").status_code == 200
        response = client.post(f"/classify?mode={mode}", content=encode_png(pixels[None])[0],
                               headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    assert response.headers["server-timing"].startswith("total;dur=")
    answer = response.json()["results"][0]
    expected = (runner.run_original(pixels[None]) if mode == "original"
                else runner.run(pixels[None])).predictions[0]
    assert [label for label, _ in answer["top"]] == list(np.argsort(-expected.scores)[:5])
    assert answer["flops"] == {"total": expected.flops.total, "saving": expected.flops.saving}
    if mode == "original":
        assert answer["flops"]["total"] == runner.manifest.original.flops


def _cell(mode: str, p50: float, **settings) -> dict:
    return {"batching": True, "mode": mode, "concurrency": 1,
            "p50_ms": p50, "p99_ms": p50, "server_p50_ms": p50, "throughput_rps": 1e3 / p50,
            "flop_saving": 0.5 if mode == "conditional" else 0.0, **settings}


def test_targets_judge_the_service_not_the_floor():
    # The floor would pass both c=1 targets and comes first; the service fails them.
    served = [_cell("conditional", 1.0, batching=False, floor=True),
              _cell("original", 10.0, batching=False, floor=True),
              _cell("conditional", 9.0), _cell("original", 10.0)]
    result = {"served": served, "concurrency": [1],
              "raw": [{"mode": "conditional", "p50_ms": 2.0}, {"mode": "original", "p50_ms": 4.0}]}
    flops_target, overhead_target = targets(result)[:2]
    assert not flops_target["ok"]  # 9.0 > 10.0 × (1 − 0.8 × 0.5) = 6.0
    assert "9.00 ms vs bound 6.00 ms" in flops_target["detail"]
    assert "the floor server: 1.00 ms vs bound 6.00 ms" in flops_target["detail"]
    assert not overhead_target["ok"]  # 9.0 > 1.3 × 2.0
    assert "the floor server: 1.00 ms = 0.50×" in overhead_target["detail"]
    # Raw 2.0 vs 4.0 ms at a 50% saving leaves (0.6 × 4 − 2) / 0.4 = 1.0 ms for serving; the
    # service spent 9.0 − 2.0 = 7.0 ms beyond raw compute.
    assert flops_target["overhead_room_ms"] == pytest.approx(1.0)
    assert "at most 1.00 ms a request for serving" in flops_target["detail"]
    assert "the service 7.00 ms" in flops_target["detail"]
    assert overhead_target["overhead_room_ms"] == pytest.approx(0.6)  # 0.3 × raw 2.0


def test_batching_target_takes_the_default_server_alone_not_its_side_by_side_rows():
    def row(batching, rps, **settings):
        return {**_cell("conditional", 10.0, batching=batching, **settings), "concurrency": 32,
                "throughput_rps": rps}

    served = [row(True, 300.0, interleaved=True),  # side by side with another server: shared time
              row(True, 250.0, interleaved=True),
              row(True, 600.0), row(False, 250.0)]
    target = targets({"served": served, "concurrency": [32], "raw": []})[-1]
    assert target["ok"] and "600.0 vs 250.0 req/s = 2.40×" in target["detail"]


def test_c1_targets_take_raw_compute_measured_beside_the_servers():
    """The in-process rows' own run time (side by side with the servers) is the raw compute the
    c=1 targets compare with; the tight loop's figure is still reported; the in-process rows are
    never judged as the service."""
    served = [_cell("conditional", 3.0), _cell("original", 3.1),
              _cell("conditional", 0.5, batching=False, raw=True),  # first: must not be "the service"
              _cell("original", 0.6, batching=False, raw=True)]
    for row, run_ms in zip(served[2:], (2.5, 2.6), strict=True):
        row["server_p50_ms"] = run_ms
    result = {"served": served, "concurrency": [1],
              "raw": [{"mode": "conditional", "p50_ms": 2.0}, {"mode": "original", "p50_ms": 2.1}]}
    flops_target, overhead_target = targets(result)[:2]
    assert "3.00 ms vs bound" in flops_target["detail"]
    assert flops_target["overhead_room_ms"] == pytest.approx(overhead_room(2.5, 2.6, 0.5))
    assert overhead_target["ok"]  # 3.0 <= 1.3 x 2.5 (not 1.3 x 2.0)
    assert overhead_target["detail"].startswith("3.00 ms vs raw 2.50 ms = 1.20×")
    assert "against the tight loop's raw 2.00 ms: 1.50×" in overhead_target["detail"]
    assert overhead_target["overhead_room_ms"] == pytest.approx(0.75)


def test_in_process_raw_compute_takes_its_turn_beside_a_server():
    """Driven like a server, the in-process runner answers each image with the runner's own FLOPs
    and reports the run's time as its server time."""
    runner = PackageRunner(SHIPPED_PACKAGE, verify=False)
    size = runner.manifest.input.size
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    bodies = encode_png(images)
    log: list[tuple[str, str]] = []
    server = _FakeServer("a", log)
    in_process = InProcess(runner, images, bodies, tau=0.5)

    async def run() -> list[dict]:
        await server.start()
        targets_ = [(t, mode) for t in (server, in_process) for mode in ("conditional", "original")]
        return await drive(targets_, bodies, concurrency=1, seconds=0.8, block_seconds=0.1)

    cells = asyncio.run(run())
    assert all(c["requests"] > 0 and c["errors"] == 0 and c["interleaved"] for c in cells)
    assert log  # the server had its turns too
    raw_cond, raw_orig = cells[2:]
    assert raw_cond["raw"] and raw_orig["raw"] and not raw_cond["batching"]
    assert raw_orig["mean_flops"] == runner.manifest.original.flops
    expected = [runner.run(img[None], 0.5).predictions[0].flops.total for img in images]
    assert min(expected) <= raw_cond["mean_flops"] <= max(expected)
    assert 0 < raw_cond["server_p50_ms"] <= raw_cond["p50_ms"]


@pytest.mark.parametrize("saving", [0.1, 0.32, 0.6, 0.9])
def test_overhead_room_is_a_quarter_of_raw_compute_when_time_follows_flops(saving):
    raw_orig = 8.0
    room = overhead_room((1 - saving) * raw_orig, raw_orig, saving)
    assert room == pytest.approx(raw_orig / 4)
    # Served with exactly that overhead, the conditional path sits on the target's bound.
    served_cond, served_orig = (1 - saving) * raw_orig + room, raw_orig + room
    assert served_cond == pytest.approx(served_orig * (1 - 0.8 * saving))


def test_overhead_room_is_negative_when_compute_saves_too_little_time():
    # 32% fewer FLOPs but only 10% less time at batch 1: no serving overhead is small enough.
    assert overhead_room(0.9, 1.0, 0.32) < 0
    result = {"concurrency": [1], "served": [_cell("conditional", 1.5), _cell("original", 1.6)],
              "raw": [{"mode": "conditional", "p50_ms": 0.9}, {"mode": "original", "p50_ms": 1.0}]}
    assert "no server can meet it" in targets(result)[0]["detail"]


class _FakeServer:
    """An HTTP/1.1 keep-alive server on loopback that answers every POST like /classify and
    records (server, mode) in arrival order."""

    def __init__(self, name: str, log: list[tuple[str, str]], status: str = "200 OK") -> None:
        self.name, self.log, self.settings, self.port = name, log, {"server": name}, 0
        self.status = status

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            lines = head.decode().split("\r\n")
            length = next(int(line.split(":")[1]) for line in lines
                          if line.lower().startswith("content-length"))
            await reader.readexactly(length)
            self.log.append((self.name, lines[0].split("mode=")[1].split(" ")[0]))
            body = b'{"results": [{"flops": {"total": 1, "saving": 0.0}}]}'
            writer.write(f"HTTP/1.1 {self.status}\r\n".encode() + b"Server-Timing: total;dur=1.0\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()


def test_drive_takes_the_servers_in_blocks_and_alternates_modes_within():
    log: list[tuple[str, str]] = []
    servers = [_FakeServer("a", log), _FakeServer("b", log)]

    async def run() -> list[dict]:
        for server in servers:
            await server.start()
        targets_ = [(server, mode) for server in servers for mode in ("conditional", "original")]
        return await drive(targets_, [b"image"], concurrency=1, seconds=0.8, block_seconds=0.1)

    cells = asyncio.run(run())
    assert all(c["requests"] > 0 and c["errors"] == 0 and c["interleaved"] for c in cells)
    # Runs of consecutive requests to one server: the servers took turns several times (in the
    # warm-up and the timed phase), each time for many requests, not request by request.
    runs: list[list[str]] = []
    for i, (name, mode) in enumerate(log):
        if i == 0 or log[i - 1][0] != name:
            runs.append([])
        runs[-1].append(mode)
    assert len(runs) >= 4
    assert len(runs) < len(log) / 4
    # Within a run the server's two modes alternate in rounds of one each (a run that spans the
    # end of the warm-up may hold one unfinished round), in an order drawn anew each round.
    assert all(abs(run.count("conditional") - run.count("original")) <= 2 for run in runs)
    firsts = {run[i] for run in runs for i in range(2, len(run) - 1, 2)}
    assert firsts == {"conditional", "original"}


def test_batch_curve_times_both_modes_at_each_batch_size():
    runner = PackageRunner(SHIPPED_PACKAGE, verify=False)
    size = runner.manifest.input.size
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    rows = batch_curve(runner, images, tau=0.5, sizes=(1, 4), repeats=1)
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["conditional_ms"] > 0 and r["original_ms"] > 0
        assert r["ratio"] == pytest.approx(r["conditional_ms"] / r["original_ms"])
        assert set(r["stages_ms"]) == {"trunk", "clustifier", "activator", "heads", "combine"}


def test_soak_memory_growth_compares_medians_not_single_samples():
    """A reload's swing in one sample, or a plateau reached early, is not growth; RSS rising
    with the requests is."""
    from bench.soak import rss_growth

    settling = [250, 260, 300, 380, 300, 302, 299, 301, 300, 298, 360, 301]  # plateau, spikes
    early, late, growth = rss_growth(settling)
    assert (early, late) == (340, 330.5) and growth < 0  # second and last fifths, medians
    rising = [300 + 10 * i for i in range(20)]  # a leak: +50% between the fifths compared
    early, late, growth = rss_growth(rising)
    assert early == 355 and late == 475 and growth > 0.3
    assert rss_growth([500])[2] == 0.0
    assert np.isnan(rss_growth([])[2])


def test_drive_says_so_when_a_cell_got_no_answer():
    """A server that answers nothing but errors (or a cell too short for its turn) is reported
    as such, not as a numpy error on an empty list of latencies."""
    server = _FakeServer("down", [], status="503 Service Unavailable")

    async def run() -> list[dict]:
        await server.start()
        return await drive([(server, "conditional")], [b"image"], concurrency=1, seconds=0.2)

    with pytest.raises(RuntimeError, match=r"no answered request for conditional .* errors\); give"):
        asyncio.run(run())
