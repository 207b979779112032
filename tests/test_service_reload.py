"""Hot reload: ``POST /admin/reload`` swaps packages atomically, refuses a broken one, and loses
no request while it happens."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import weakref

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from modelpack.manifest import copy_package
from service.app import create_app
from service.settings import Settings
from tests.conftest import SHIPPED_PACKAGE

TOKEN = "reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
A, B = "1.0.0-a", "2.0.0-b"  # versions of the two copies


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    copy_package(SHIPPED_PACKAGE, root / "a", version=A)
    b = copy_package(SHIPPED_PACKAGE, root / "b", version=B)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["activator"]["default_tau"] = 0.25  # so τ's policy across a reload shows
    (b / "manifest.json").write_text(json.dumps(manifest))
    tampered = copy_package(SHIPPED_PACKAGE, root / "tampered")
    with (tampered / "head1.onnx").open("ab") as f:
        f.write(b"tampered")
    (root / "no-manifest").mkdir()
    schema = copy_package(SHIPPED_PACKAGE, root / "bad-schema")
    (schema / "manifest.json").write_text(json.dumps({"name": "x"}))
    return root


def make_app(models_root, **overrides):
    registry = CollectorRegistry()
    settings = Settings(model_dir=models_root / "a", admin_token=TOKEN, **overrides)
    return create_app(settings, registry=registry), registry


def png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, format="PNG")
    return buf.getvalue()


def classify(client) -> httpx.Response:
    return client.post("/classify", content=png(), headers={"Content-Type": "image/png"})


def reload(client, package: str):
    return client.post("/admin/reload", json={"package": package}, headers=AUTH)


def test_reload_swaps_the_package_and_answers_with_it(models_root):
    app, registry = make_app(models_root)
    with TestClient(app) as client:
        assert classify(client).json()["model"] == {"name": "synthetic", "version": A}
        r = reload(client, "b")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == {"name": "synthetic", "version": B}
        assert body["previous"] == {"name": "synthetic", "version": A}
        assert body["default_tau"] == 0.25 and body["seconds"] > 0
        assert classify(client).json()["model"]["version"] == B
        assert client.get("/readyz").json()["model"]["version"] == B
        assert client.get("/v1/model").json()["version"] == B
        get = registry.get_sample_value
        info = {"name": "synthetic", "version": B, "num_classes": "12", "num_heads": "4",
                "backend": "onnxruntime", "precision": "fp32"}
        assert get("cpcnn_model_info", info) == 1
        assert get("cpcnn_model_info", {**info, "version": A}) is None  # the info names B alone
        assert get("cpcnn_reloads_total", {"result": "ok"}) == 1
        assert get("cpcnn_reloads_total", {"result": "rejected"}) == 0
        for head in range(4):
            assert get("cpcnn_head_activations_total", {"head": str(head)}) is not None
        assert get("cpcnn_model_ready") == 1


def test_a_replaced_package_is_freed(models_root):
    app, _ = make_app(models_root)
    with TestClient(app) as client:
        replaced = []
        for package in ("b", "a", "b"):
            replaced.append(weakref.ref(app.state.service.runner))
            assert classify(client).status_code == 200
            assert reload(client, package).status_code == 200
        assert classify(client).status_code == 200
        assert [ref() for ref in replaced] == [None] * 3  # no request holds them: sessions freed


@pytest.mark.parametrize("package, message", [
    ("tampered", "sha256 mismatch for head1.onnx"),
    ("no-manifest", "no manifest.json"),
    ("bad-schema", "does not match the manifest schema"),
])
def test_a_broken_package_is_refused_and_the_old_one_keeps_serving(models_root, package, message):
    app, registry = make_app(models_root)
    with TestClient(app) as client:
        r = reload(client, package)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "package_rejected"
        assert message in r.json()["error"]["message"]
        assert f"still serving synthetic {A}" in r.json()["error"]["message"]
        assert classify(client).json()["model"]["version"] == A
        assert client.get("/readyz").status_code == 200
        assert registry.get_sample_value("cpcnn_reloads_total", {"result": "rejected"}) == 1


def test_tau_follows_the_package_unless_an_operator_set_it(models_root):
    app, registry = make_app(models_root)
    with TestClient(app) as client:
        assert client.get("/admin/tau", headers=AUTH).json()["tau"] == 0.7  # A's default
        assert reload(client, "b").json()["tau"] == 0.25  # not set by anyone: B's default
        assert registry.get_sample_value("cpcnn_tau") == 0.25
        assert classify(client).json()["tau"] == 0.25
        assert client.put("/admin/tau", json={"tau": 0.4}, headers=AUTH).status_code == 200
        assert reload(client, "a").json()["tau"] == 0.4  # set by an operator: kept
        assert classify(client).json()["tau"] == 0.4
    app, _ = make_app(models_root, tau=0.9)  # CPCNN_TAU is an operator's choice too
    with TestClient(app) as client:
        assert reload(client, "b").json()["tau"] == 0.9


def test_a_second_reload_while_one_runs_is_409(models_root):
    app, _ = make_app(models_root)

    async def main():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            answers = await asyncio.gather(*(
                client.post("/admin/reload", json={"package": p}, headers=AUTH)
                for p in ("b", "a")))
            served = (await client.get("/readyz")).json()["model"]["version"]
            return answers, served

    answers, served = asyncio.run(main())
    by_status = {r.status_code: r for r in answers}
    assert sorted(by_status) == [200, 409], [r.text for r in answers]  # either may come first
    assert by_status[409].json()["error"]["code"] == "reload_in_progress"
    assert served == by_status[200].json()["model"]["version"]


@pytest.mark.parametrize("batching", [True, False])
def test_reload_under_load_loses_no_request(models_root, batching):
    """Classify requests run the whole time while the package is swapped back and forth and τ
    changes; every one answers 200 from one of the two packages."""
    app, registry = make_app(models_root, batching=batching, max_batch_delay_ms=5)
    reloads = 6
    blobs = [png((i * 37 % 256, 90, 255 - i * 23 % 256)) for i in range(8)]

    async def main():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test",
                timeout=120) as client:
            done = asyncio.Event()
            responses: list[tuple[int, httpx.Response]] = []  # (images sent, answer)

            async def worker(i: int) -> None:
                n = 0
                while not done.is_set() or n < 3:
                    files = [("file", (f"{j}.png", blobs[(i + j) % 8], "image/png"))
                             for j in range(1 + (i + n) % 3)]
                    mode = "original" if (i + n) % 5 == 0 else "conditional"
                    responses.append((len(files), await client.post(
                        f"/classify?top_k=2&mode={mode}", files=files)))
                    n += 1

            async def operator() -> list[httpx.Response]:
                answers = []
                for k in range(reloads):
                    await asyncio.sleep(0.05)
                    answers.append(await client.put("/admin/tau", json={"tau": (k % 4) / 4},
                                                    headers=AUTH))
                    answers.append(await client.post(
                        "/admin/reload", json={"package": "b" if k % 2 == 0 else "a"},
                        headers=AUTH))
                done.set()
                return answers

            workers = [asyncio.create_task(worker(i)) for i in range(8)]
            admin = await operator()
            await asyncio.gather(*workers)
            return responses, admin

    responses, admin = asyncio.run(main())
    assert [r.status_code for r in admin] == [200] * (2 * reloads), [r.text for r in admin]
    assert [r.json()["model"]["version"] for r in admin[1::2]] == [B, A] * (reloads // 2)
    assert len(responses) >= 8 * 3
    failed = [(r.status_code, r.text) for _, r in responses if r.status_code != 200]
    assert not failed, failed[:3]
    versions = {r.json()["model"]["version"] for _, r in responses}
    assert versions == {A, B}, versions  # both packages answered, no other
    assert all(len(r.json()["results"]) == n for n, r in responses)
    assert registry.get_sample_value("cpcnn_reloads_total", {"result": "ok"}) == reloads
    assert registry.get_sample_value("cpcnn_in_flight_requests") == 0


def test_a_reload_past_its_deadline_is_abandoned_and_releases_the_lock(models_root, monkeypatch):
    """A load that hangs (a stuck filesystem) used to hold the reload lock for good: every later
    reload answered reload_in_progress until a restart."""
    import threading
    import time

    from service.runtime import InferenceService

    release = threading.Event()
    real_load = InferenceService._load

    def hanging_load(self, package_dir):
        if package_dir.name == "b":
            release.wait(30)  # hangs until the test lets it go
        return real_load(self, package_dir)

    monkeypatch.setattr(InferenceService, "_load", hanging_load)
    app, registry = make_app(models_root, reload_timeout_s=0.5)
    try:
        with TestClient(app) as client:
            t0 = time.perf_counter()
            stuck = reload(client, "b")
            assert time.perf_counter() - t0 < 5
            assert stuck.status_code == 409 and stuck.json()["error"]["code"] == "reload_timeout"
            assert "CPCNN_RELOAD_TIMEOUT_S" in stuck.text
            assert classify(client).json()["model"]["version"] == A  # the old one serves
            assert registry.get_sample_value("cpcnn_reloads_total", {"result": "timeout"}) == 1
            again = reload(client, "a")  # the lock is free again
            assert again.status_code == 200, again.text
    finally:
        release.set()


def test_a_v2_answer_comes_from_the_package_it_names_even_across_a_reload(models_root):
    """The name is checked against the snapshot the request runs on: a reload while the body
    streams in cannot make another package answer (it did for 15 of 1,028 requests)."""
    app, _ = make_app(models_root)

    async def main():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            reloaded = asyncio.Event()

            async def slow_body():
                yield b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", '
                await reloaded.wait()  # the reload completes while this body is in flight
                yield b'"data": ["' + base64.b64encode(png()) + b'"]}]}'

            request = asyncio.create_task(client.post(
                "/v2/models/synthetic/infer", content=slow_body(),
                headers={"Content-Type": "application/json"}))
            await asyncio.sleep(0.2)
            swapped = await client.post("/admin/reload", json={"package": "b"}, headers=AUTH)
            reloaded.set()
            return swapped, await request

    swapped, answer = asyncio.run(main())
    assert swapped.status_code == 200
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_name"] == "synthetic" and body["model_version"] == A  # not B's
