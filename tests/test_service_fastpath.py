"""The /classify fast path: it answers exactly what FastAPI's route answers, takes only requests
FastAPI would have nothing to decide about, and is counted like any other request."""

from __future__ import annotations

import io

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from PIL import Image

from service.deps import OptionalServiceDep, get_ready_service
from service.fastpath import plain_query
from service.runtime import InferenceService
from tests.conftest import make_app


def _png(color=(200, 30, 30), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("query, want", [
    ("", {"top_k": None, "tau": None, "mode": "conditional"}),
    ("top_k=3", {"top_k": 3, "tau": None, "mode": "conditional"}),
    ("tau=0.35&mode=original", {"top_k": None, "tau": 0.35, "mode": "original"}),
    ("tau=0&top_k=999999", {"top_k": 999999, "tau": 0.0, "mode": "conditional"}),
    ("tau=1.000&other=x&y", {"top_k": None, "tau": 1.0, "mode": "conditional"}),
])
def test_plain_query_reads_the_plain_spellings(query, want):
    assert plain_query(query) == want


@pytest.mark.parametrize("query", [
    "tau=.5", "tau=1.5", "tau=-0", "tau=0.5e0", "tau=nan", "tau=", "tau",
    "top_k=0", "top_k=05", "top_k=1000000", "top_k=+3", "top_k=3&top_k=4",
    "mode=Original", "mode=", "to%70_k=3", "mode+=original", "x%20y=1",
])
def test_plain_query_leaves_everything_else_to_fastapi(query):
    assert plain_query(query) is None


@pytest.fixture(scope="module")
def apps(synthetic_package):
    """The same package served with the fast path and without it, and the queries of the
    requests that went through FastAPI's /classify route (its dependencies ran)."""
    reached: list[str] = []

    async def counting(request: Request, service: OptionalServiceDep) -> InferenceService:
        reached.append(request.url.query)
        return await get_ready_service(service)

    on, _ = make_app(synthetic_package)
    off, _ = make_app(synthetic_package, classify_fast_path=False)
    for app in (on, off):
        app.dependency_overrides[get_ready_service] = counting
    with TestClient(on) as fast, TestClient(off) as slow:
        yield fast, slow, reached


def _comparable(response) -> tuple:
    """Status, content type and body, without the latency that differs from run to run."""
    body = response.json()
    for part in (body, *body.get("results", ())):
        part.pop("latency", None)
    return response.status_code, response.headers["content-type"], body


REQUESTS = [  # (query, content, headers or multipart files)
    ("", _png(), {"Content-Type": "image/png"}),
    ("top_k=3&tau=0.2", _png((30, 200, 30), (64, 32)), {"Content-Type": "image/png"}),
    ("mode=original&top_k=2", _png((30, 30, 200)), {"Content-Type": "image/png"}),
    ("tau=1", None, [("file", ("a.png", _png(), "image/png")),
                     ("file", ("b.png", _png((0, 0, 255)), "image/png"))]),
    ("", b"", {"Content-Type": "image/png"}),  # empty body: 400
    ("", b"not an image", {"Content-Type": "image/png"}),  # 400 invalid_image
    ("", b"text", {"Content-Type": "text/plain"}),  # 415
]


@pytest.mark.parametrize("query, content, extra", REQUESTS)
def test_the_fast_path_answers_what_the_route_answers(apps, query, content, extra):
    fast, slow, reached = apps
    reached.clear()
    kwargs = ({"files": extra} if isinstance(extra, list) else
              {"content": content, "headers": extra})
    a = fast.post(f"/classify?{query}", **kwargs)
    assert reached == []  # served by the fast path, not FastAPI's route
    b = slow.post(f"/classify?{query}", **kwargs)
    assert reached == [query]
    assert _comparable(a) == _comparable(b)
    if a.status_code == 200:
        stages = {part.split(";")[0] for part in a.headers["server-timing"].split(", ")}
        assert stages == {part.split(";")[0] for part in b.headers["server-timing"].split(", ")}
        assert "total" in stages


@pytest.mark.parametrize("query", ["tau=.5", "tau=2", "top_k=0", "mode=bogus", "top_k=3&top_k=3"])
def test_other_queries_go_to_fastapi_and_get_its_answer(apps, query):
    fast, slow, reached = apps
    reached.clear()
    a = fast.post(f"/classify?{query}", content=_png(), headers={"Content-Type": "image/png"})
    b = slow.post(f"/classify?{query}", content=_png(), headers={"Content-Type": "image/png"})
    assert reached == [query, query]  # both through FastAPI's route
    assert _comparable(a) == _comparable(b)


def test_not_ready_and_other_paths_are_fastapis(synthetic_package):
    app, _ = make_app(synthetic_package)
    client = TestClient(app)  # lifespan not run: the service is not loaded
    r = client.post("/classify", content=_png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    with client:
        r = client.get("/classify")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        r = client.delete("/admin/tau")  # a path with two routes: both methods named
        assert r.status_code == 405 and r.headers["allow"] == "GET, PUT"


def test_fast_requests_are_counted_like_the_routes(synthetic_package):
    app, registry = make_app(synthetic_package)
    with TestClient(app) as client:
        for query in ("", "tau=.5"):  # the fast path, then FastAPI's route
            assert client.post(f"/classify?{query}", content=_png(),
                               headers={"Content-Type": "image/png"}).status_code == 200
        client.post("/classify", content=b"x", headers={"Content-Type": "image/png"})  # 400
    labels = {"endpoint": "/classify", "method": "POST"}
    assert registry.get_sample_value("cpcnn_requests_total", {**labels, "status": "200"}) == 2
    assert registry.get_sample_value("cpcnn_requests_total", {**labels, "status": "400"}) == 1
    assert registry.get_sample_value("cpcnn_in_flight_requests") == 0
