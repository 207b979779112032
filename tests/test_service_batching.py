"""Dynamic micro-batching: every request gets its own images' results, whatever shares its batch."""

from __future__ import annotations

import asyncio
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from modelpack.runner import BatchResult, Flops, PackageRunner, Prediction
from service.app import create_app
from service.batcher import MicroBatcher
from service.settings import Settings


# -- the batcher alone, with a fake model whose answer encodes its input ----------------------
def fake_run(calls):
    def run(key, images, taus):
        calls.append((key, len(images), taus.tolist()))
        if key == "boom":
            raise RuntimeError("model failed")
        preds = [Prediction(scores=np.array([float(img[0, 0, 0]), t]),
                            flops=Flops(0, 0, 0, 0, 0)) for img, t in zip(images, taus, strict=True)]
        return BatchResult(preds, {"trunk": 0.001})
    return run


def img(value, n=1):
    return np.full((n, 2, 2, 3), value, dtype=np.uint8)


async def _gather_batched(max_batch_size=64, max_delay=0.05, requests=()):
    calls = []
    batcher = MicroBatcher(fake_run(calls), max_batch_size=max_batch_size, max_delay=max_delay)
    batcher.start()
    try:
        out = await asyncio.gather(*(batcher.submit(i, t, k) for i, t, k in requests),
                                   return_exceptions=True)
    finally:
        await batcher.stop()
    return out, calls


def test_each_request_gets_its_own_slice():
    requests = [(img(10 + i, n=1 + i % 3), 0.1 * i, "cond") for i in range(8)]
    out, calls = asyncio.run(_gather_batched(requests=requests))
    assert len(calls) == 1 and calls[0][1] == sum(1 + i % 3 for i in range(8))  # one model run
    for i, result in enumerate(out):
        assert len(result.predictions) == 1 + i % 3
        for p in result.predictions:
            assert p.scores[0] == 10 + i  # its own images
            assert p.scores[1] == pytest.approx(0.1 * i)  # its own τ
        assert result.batch_size == calls[0][1]
        assert "queue" in result.timings


def test_max_batch_size_splits_runs():
    requests = [(img(i, n=2), 0.5, "cond") for i in range(5)]
    out, calls = asyncio.run(_gather_batched(max_batch_size=4, requests=requests))
    assert [n for _, n, _ in calls] == [4, 4, 2]
    assert [r.predictions[0].scores[0] for r in out] == [0, 1, 2, 3, 4]


def test_keys_never_share_a_run_and_errors_stay_in_their_run():
    requests = [(img(1), 0.5, "a"), (img(2), 0.5, "boom"), (img(3), 0.5, "a")]
    out, calls = asyncio.run(_gather_batched(requests=requests))
    assert sorted((k, n) for k, n, _ in calls) == [("a", 2), ("boom", 1)]
    assert isinstance(out[1], RuntimeError)
    assert out[0].predictions[0].scores[0] == 1 and out[2].predictions[0].scores[0] == 3


def test_zero_delay_still_answers():
    out, calls = asyncio.run(_gather_batched(max_delay=0.0, requests=[(img(7), 0.2, "c")]))
    assert out[0].predictions[0].scores[0] == 7 and len(calls) == 1


# -- the real app: concurrent requests through ASGI, results equal to unbatched runs ----------
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


async def _fire(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(
            client.post(f"/classify?top_k=3&tau={tau}&mode={mode}",
                        files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
            for blobs, tau, mode in bodies))


def test_concurrent_requests_match_unbatched_results(synthetic_run, synthetic_package):
    images, _ = synthetic_run.part("val")
    runner = PackageRunner(synthetic_package)
    # Find images the clustifier routes to different heads, so one batch mixes routes.
    routes = [p.activation.heads[0] for p in runner.run(images[:64], 0.0).predictions]
    by_head = {}
    for i, h in enumerate(routes):
        by_head.setdefault(h, []).append(i)
    assert len(by_head) >= 2, "the synthetic val images should reach several heads"
    heads = sorted(by_head)
    mixed = [by_head[heads[0]][0], by_head[heads[1]][0]]  # one request, two different heads
    bodies = [
        ([_png(images[j]) for j in mixed], 0.0, "conditional"),
        ([_png(images[by_head[heads[0]][1 % len(by_head[heads[0]])]])], 1.0, "conditional"),
        ([_png(images[by_head[heads[-1]][0]])], 0.7, "conditional"),
        ([_png(images[3]), _png(images[4])], 0.7, "original"),
    ] * 3
    registry = CollectorRegistry()
    app = create_app(Settings(model_dir=synthetic_package, max_batch_delay_ms=200,
                              max_batch_size=64), registry=registry)
    responses = asyncio.run(_fire(app, bodies))
    for (blobs, tau, mode), r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["results"]) == len(blobs)
        arrays = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in blobs])
        alone = runner.run_original(arrays) if mode == "original" else runner.run(arrays, tau)
        for got, want in zip(body["results"], alone.predictions, strict=True):
            best = int(np.argmax(want.scores))
            assert got["predictions"][0]["index"] == best
            assert got["predictions"][0]["score"] == pytest.approx(want.scores[best], abs=1e-5)
            assert got["flops"]["total"] == want.flops.total
            if mode == "conditional":
                assert [h["head"] for h in got["heads"]] == list(want.activation.heads)
    first = responses[0].json()["results"]
    assert first[0]["heads"][0]["head"] != first[1]["heads"][0]["head"]  # mixed routes, one request
    # Batches formed: fewer conditional model runs than conditional requests.
    runs = registry.get_sample_value("cpcnn_batch_size_count", {"mode": "conditional"})
    images_run = registry.get_sample_value("cpcnn_batch_size_sum", {"mode": "conditional"})
    assert images_run == sum(len(b) for b, _, m in bodies if m == "conditional")
    assert runs < sum(1 for _, _, m in bodies if m == "conditional")


def test_batching_off_runs_each_request_alone(synthetic_package):
    registry = CollectorRegistry()
    app = create_app(Settings(model_dir=synthetic_package, batching=False), registry=registry)
    blob = _png(np.full((32, 32, 3), 90, dtype=np.uint8))
    responses = asyncio.run(_fire(app, [([blob, blob], 0.7, "conditional")] * 4))
    assert all(r.status_code == 200 for r in responses)
    assert registry.get_sample_value("cpcnn_batch_size_count", {"mode": "conditional"}) == 4
    assert registry.get_sample_value("cpcnn_batch_size_sum", {"mode": "conditional"}) == 8


# -- where a run happens: on the event loop when alone and small, else in a worker thread ------
def test_idle_only_with_nothing_queued_or_running():
    running, release = threading.Event(), threading.Event()

    def slow_run(key, images, taus):
        running.set()
        release.wait(5)
        return fake_run([])(key, images, taus)

    async def go():
        batcher = MicroBatcher(slow_run, max_batch_size=8, max_delay=0.0)
        batcher.start()
        states = [batcher.idle]
        pending = asyncio.get_running_loop().create_task(batcher.submit(img(1), 0.5, "c"))
        await asyncio.sleep(0)
        states.append(batcher.idle)  # queued
        while not running.is_set():
            await asyncio.sleep(0.001)
        states.append(batcher.idle)  # running in its worker thread
        release.set()
        await pending
        states.append(batcher.idle)
        await batcher.stop()
        return states

    assert asyncio.run(go()) == [True, False, False, True]


@pytest.mark.parametrize("batching", [True, False])
def test_lone_small_request_runs_on_the_loop_and_concurrent_ones_do_not(
        synthetic_package, monkeypatch, batching):
    from service.runtime import INLINE_RUN_MAX_IMAGES, InferenceService

    runs = []  # (thread, images) of each model run
    real = InferenceService._run_batch

    def spy(key, batch, taus):
        runs.append((threading.current_thread(), len(batch)))
        return real(key, batch, taus)

    monkeypatch.setattr(InferenceService, "_run_batch", staticmethod(spy))
    blob = _png(np.full((32, 32, 3), 90, dtype=np.uint8))

    async def scenario(app):
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://test") as client:
            runs.clear()
            alone = await client.post("/classify", content=blob,
                                      headers={"content-type": "image/png"})
            lone_runs = list(runs)
            big = await client.post("/classify", files=[("file", (f"{i}.png", blob, "image/png"))
                                                         for i in range(INLINE_RUN_MAX_IMAGES + 1)])
            big_runs = runs[len(lone_runs):]
            together = await asyncio.gather(*(client.post(
                "/classify", content=blob, headers={"content-type": "image/png"})
                for _ in range(6)))
            return alone, lone_runs, big, big_runs, together, runs[len(lone_runs) + len(big_runs):]

    app = create_app(Settings(model_dir=synthetic_package, batching=batching),
                     registry=CollectorRegistry())
    alone, lone_runs, big, big_runs, together, concurrent_runs = asyncio.run(scenario(app))
    loop_thread = threading.main_thread()
    assert alone.status_code == big.status_code == 200
    assert lone_runs == [(loop_thread, 1)]  # alone and small: on the loop, no thread hop
    assert big_runs and all(t is not loop_thread for t, _ in big_runs)  # too many images
    assert all(r.status_code == 200 for r in together)
    # Requests in flight together: their runs go to a worker thread.
    assert concurrent_runs and all(t is not loop_thread for t, _ in concurrent_runs)
    # Same answer on the loop as in a worker thread (and batched).
    want = alone.json()["results"][0]["predictions"]
    for r in together:
        got = r.json()["results"][0]["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in want]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-6)

    monkeypatch.setattr("service.runtime.INLINE_RUN_MAX_IMAGES", 0)  # no run small enough
    app = create_app(Settings(model_dir=synthetic_package, batching=batching),
                     registry=CollectorRegistry())
    alone, lone_runs, *_ = asyncio.run(scenario(app))
    assert alone.status_code == 200 and lone_runs[0][0] is not loop_thread  # switched off
