"""The service's endpoints, driven through the real ASGI app on the synthetic package."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.errors import StartupError
from service.settings import Settings
from tests.conftest import AUTH, TOKEN, make_app


def png(color=(200, 30, 30), size=(40, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def files(*blobs, names=None):
    names = names or [f"img{i}.png" for i in range(len(blobs))]
    return [("file", (n, b, "image/png")) for n, b in zip(names, blobs, strict=True)]


# -- health and readiness --------------------------------------------------------------------
def test_readyz_is_503_before_load_and_200_after(synthetic_package):
    app, _ = make_app(synthetic_package)
    client = TestClient(app)  # no `with`: the lifespan has not run, nothing is loaded
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "not_ready"
    r = client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    assert client.get("/v1/model").status_code == 503
    with client:
        r = client.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {"status": "ready", "model": {"name": "synthetic", "version": "0.1.0"}}
        assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # after shutdown


# -- /classify -------------------------------------------------------------------------------
def test_classify_multipart_several_files_schema_and_flops(served, manifest):
    client, _ = served
    blobs = [png((200, 30, 30)), png((30, 200, 30), (64, 32)), png((30, 30, 200), (20, 50))]
    r = client.post("/classify?top_k=3", files=files(*blobs, names=["r.png", "g.png", "b.png"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "mode", "tau", "top_k", "results", "latency"}
    assert body["model"] == {"name": manifest.name, "version": manifest.version}
    assert body["mode"] == "conditional"
    assert body["tau"] == manifest.activator.default_tau
    assert body["top_k"] == 3
    assert [res["filename"] for res in body["results"]] == ["r.png", "g.png", "b.png"]
    k = manifest.num_clusters
    for res in body["results"]:
        assert set(res) == {"filename", "predictions", "heads", "cluster_probs", "flops", "latency"}
        preds = res["predictions"]
        assert len(preds) == 3
        assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
        for p in preds:
            assert manifest.class_names[p["index"]] == p["class_name"]
            assert manifest.class_ids[p["index"]] == p["class_id"]
        assert len(res["cluster_probs"]) == k
        assert sum(res["cluster_probs"]) == pytest.approx(1.0)
        heads = [h["head"] for h in res["heads"]]
        assert 1 <= len(heads) <= k and len(set(heads)) == len(heads)
        assert sum(h["weight"] for h in res["heads"]) == pytest.approx(1.0)
        # FLOPs = trunk + clustifier + the heads reported as run, from the manifest
        f = res["flops"]
        head_flops = sum(manifest.clusters[h].head.flops for h in heads)
        assert f["trunk"] == manifest.trunk.flops
        assert f["clustifier"] == manifest.clustifier.flops
        assert f["heads"] == head_flops
        assert f["total"] == manifest.trunk.flops + manifest.clustifier.flops + head_flops
        assert f["original"] == manifest.original.flops
        assert f["saving"] == pytest.approx(1 - f["total"] / manifest.original.flops)
        assert [h["flops"] for h in res["heads"]] == [manifest.clusters[h].head.flops for h in heads]
        lat = res["latency"]
        for stage in ("decode", "preprocess", "trunk", "clustifier", "activator", "heads",
                      "combine", "total"):
            assert lat[stage] >= 0
        assert lat["original"] is None
    assert body["latency"]["total"] >= body["latency"]["decode"]


def test_top_k_larger_than_classes_is_clamped(served, manifest):
    client, _ = served
    r = client.post("/classify?top_k=1000", files=files(png()))
    assert r.status_code == 200
    n = len(manifest.class_names)
    assert r.json()["top_k"] == n
    preds = r.json()["results"][0]["predictions"]
    assert sorted(p["index"] for p in preds) == list(range(n))
    assert sum(p["score"] for p in preds) == pytest.approx(1.0)


def test_default_top_k_from_settings(synthetic_package):
    app, _ = make_app(synthetic_package, default_top_k=2)
    with TestClient(app) as client:
        r = client.post("/classify", files=files(png()))
        assert r.json()["top_k"] == 2 and len(r.json()["results"][0]["predictions"]) == 2


@pytest.mark.parametrize("tau, expect", [(0.0, "one"), (1.0, "all")])
def test_tau_zero_runs_one_head_and_one_runs_all(served, manifest, tau, expect):
    client, _ = served
    blobs = [png((i * 40 % 256, 255 - i * 30, i * 70 % 256)) for i in range(6)]
    r = client.post(f"/classify?tau={tau}", files=files(*blobs))
    assert r.status_code == 200
    body = r.json()
    assert body["tau"] == tau
    for res in body["results"]:
        heads = [h["head"] for h in res["heads"]]
        if expect == "one":
            assert len(heads) == 1
            assert heads[0] == int(np.argmax(res["cluster_probs"]))
        else:
            assert sorted(heads) == list(range(manifest.num_clusters))
            assert res["flops"]["total"] == manifest.shared_flops() + sum(
                c.head.flops for c in manifest.clusters)


def test_raw_body(served):
    client, _ = served
    r = client.post("/classify?top_k=1", content=png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    res = r.json()["results"]
    assert len(res) == 1 and res[0]["filename"] is None and len(res[0]["predictions"]) == 1
    r = client.post("/classify", content=png(), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200


def test_original_mode(served, manifest):
    client, _ = served
    r = client.post("/classify?mode=original&tau=0.3", files=files(png(), png((0, 0, 255))))
    assert r.status_code == 200
    body = r.json()
    assert body["mode"] == "original" and body["tau"] is None
    for res in body["results"]:
        assert res["heads"] is None and res["cluster_probs"] is None
        f = res["flops"]
        assert f == {"trunk": 0, "clustifier": 0, "heads": 0, "total": manifest.original.flops,
                     "original": manifest.original.flops, "saving": 0.0}
        lat = res["latency"]
        assert lat["original"] >= 0 and lat["trunk"] is None and lat["heads"] is None
    timing = r.headers["Server-Timing"]
    assert "original;dur=" in timing and "trunk" not in timing


def test_server_timing_header_is_parseable(served):
    client, _ = served
    r = client.post("/classify", files=files(png()))
    entries = [e.strip() for e in r.headers["Server-Timing"].split(",")]
    parsed = {}
    for e in entries:
        m = re.fullmatch(r"([a-z]+);dur=(\d+(?:\.\d+)?)", e)
        assert m, e
        parsed[m.group(1)] = float(m.group(2))
    assert list(parsed) == ["decode", "preprocess", "trunk", "clustifier", "activator", "heads",
                            "combine", "total"]
    lat = r.json()["latency"]
    for stage, ms in parsed.items():
        assert ms == pytest.approx(lat[stage] * 1000, abs=1e-3)


def test_per_request_tau_does_not_change_server_tau(served, manifest):
    client, _ = served
    assert client.post("/classify?tau=0.2", files=files(png())).json()["tau"] == 0.2
    assert client.post("/classify", files=files(png())).json()["tau"] == manifest.activator.default_tau


def test_concurrent_requests_each_use_their_own_tau(synthetic_package):
    app, registry = make_app(synthetic_package)
    taus = [0.0, 1.0, 0.5, 0.9, 0.0, 1.0, 0.3, 0.8]

    async def fire() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await asyncio.gather(*(
                    client.post(f"/classify?tau={t}", content=png((i * 30, 100, 200)),
                                headers={"Content-Type": "image/png"})
                    for i, t in enumerate(taus)))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(taus)
    assert [r.json()["tau"] for r in responses] == taus
    assert registry.get_sample_value("cpcnn_images_total", {"mode": "conditional"}) == len(taus)
    assert registry.get_sample_value("cpcnn_in_flight_requests") == 0


# -- /v1/model -------------------------------------------------------------------------------
def test_model_metadata(served, manifest):
    client, _ = served
    r = client.get("/v1/model")
    assert r.status_code == 200
    m = r.json()
    assert {"name", "version", "classes", "clusters", "flops", "tau", "activator", "tau_sweep",
            "training", "input", "components", "backend"} <= set(m)
    assert m["name"] == manifest.name and m["num_classes"] == len(manifest.class_names)
    for c, cm in zip(m["clusters"], manifest.clusters, strict=True):
        assert c["class_names"] == [manifest.class_names[i] for i in cm.classes]
        assert c["head"]["flops"] == cm.head.flops
    assert m["flops"]["trunk"] == manifest.trunk.flops
    assert m["flops"]["clustifier"] == manifest.clustifier.flops
    assert m["flops"]["original"] == manifest.original.flops
    assert m["flops"]["heads"] == [c.head.flops for c in manifest.clusters]
    assert m["tau"] == {"default": manifest.activator.default_tau,
                        "current": manifest.activator.default_tau}
    assert m["activator"]["ranking"] == manifest.activator.ranking
    assert [row["tau"] for row in m["tau_sweep"]] == [row.tau for row in manifest.tau_sweep]
    assert m["training"]["dataset"] == manifest.training.dataset
    assert m["backend"] == {"name": "onnxruntime", "precision": "fp32",
                            "providers": ["CPUExecutionProvider"]}


def test_openapi_documents_responses(served):
    client, _ = served
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"ClassifyResponse", "ImageResult", "Latency", "ModelInfo", "TauState", "ErrorResponse"
            } <= set(schemas)
    assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


# -- admin -----------------------------------------------------------------------------------
def test_admin_refuses_missing_and_wrong_token(served):
    client, _ = served
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        r = client.get("/admin/tau", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in r.text
        r = client.put("/admin/tau", json={"tau": 0.1}, headers=headers)
        assert r.status_code == 401
    assert client.get("/admin/tau", headers=AUTH).status_code == 200


def test_admin_closed_without_token(synthetic_package):
    app = create_app(Settings(model_dir=synthetic_package), registry=CollectorRegistry())
    with TestClient(app) as client:
        for headers in ({}, AUTH):
            r = client.get("/admin/tau", headers=headers)
            assert r.status_code == 404 and r.json()["error"]["code"] == "admin_disabled"
            assert client.put("/admin/tau", json={"tau": 0.5}, headers=headers).status_code == 404


def test_admin_tau_change_shows_in_metrics_and_later_responses(fresh, manifest):
    client, registry = fresh
    default = manifest.activator.default_tau
    assert registry.get_sample_value("cpcnn_tau") == default
    r = client.get("/admin/tau", headers=AUTH)
    assert r.json()["tau"] == default and r.json()["default_tau"] == default
    swept = manifest.tau_sweep[-2]  # an exactly swept τ
    r = client.put("/admin/tau", json={"tau": swept.tau}, headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["tau"] == swept.tau and body["previous"] == default
    exp = body["expected"]
    assert exp["method"] == "exact" and exp["sweep_taus"] == [swept.tau]
    assert exp["top1"] == swept.top1 and exp["flop_saving"] == swept.flop_saving
    assert registry.get_sample_value("cpcnn_tau") == swept.tau
    assert client.post("/classify", files=files(png())).json()["tau"] == swept.tau
    assert client.get("/v1/model").json()["tau"]["current"] == swept.tau
    assert client.get("/admin/tau", headers=AUTH).json()["tau"] == swept.tau


def test_admin_tau_between_sweep_rows_is_interpolated(fresh, manifest):
    client, _ = fresh
    lo, hi = manifest.tau_sweep[2], manifest.tau_sweep[3]
    mid = (lo.tau + hi.tau) / 2
    exp = client.put("/admin/tau", json={"tau": mid}, headers=AUTH).json()["expected"]
    assert exp["method"] == "interpolated" and exp["sweep_taus"] == [lo.tau, hi.tau]
    assert exp["top1"] == pytest.approx((lo.top1 + hi.top1) / 2)
    assert exp["flop_saving"] == pytest.approx((lo.flop_saving + hi.flop_saving) / 2)
    assert exp["mean_flops"] == pytest.approx((lo.mean_flops + hi.mean_flops) / 2)


@pytest.mark.parametrize("payload", [b'{"tau": 1.5}', b'{"tau": -0.1}', b'{"tau": NaN}',
                                     b'{"tau": "high"}', b'{}', b'{"tau": 0.5, "x": 1}', b"{bad",
                                     b""])
def test_admin_put_tau_rejects_bad_values(fresh, payload):
    client, registry = fresh
    before = registry.get_sample_value("cpcnn_tau")
    r = client.put("/admin/tau", content=payload,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameter"
    assert registry.get_sample_value("cpcnn_tau") == before


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_values_are_exact(fresh, manifest):
    client, registry = fresh
    k = manifest.num_clusters
    get = registry.get_sample_value
    # Series that exist at zero before any request.
    for head in range(k):
        assert get("cpcnn_head_activations_total", {"head": str(head)}) == 0
    assert get("cpcnn_flops_executed_total", {"mode": "conditional"}) == 0
    assert get("cpcnn_model_info", {"name": manifest.name, "version": manifest.version,
                                    "num_classes": str(len(manifest.class_names)),
                                    "num_heads": str(k), "backend": "onnxruntime",
                                    "precision": "fp32"}) == 1
    assert get("cpcnn_model_ready") == 1
    r = client.post("/classify?tau=1", files=files(png(), png((0, 255, 0))))
    assert r.status_code == 200
    all_heads = manifest.shared_flops() + sum(c.head.flops for c in manifest.clusters)
    assert get("cpcnn_images_total", {"mode": "conditional"}) == 2
    assert get("cpcnn_flops_executed_total", {"mode": "conditional"}) == 2 * all_heads
    assert get("cpcnn_original_flops_total", {"mode": "conditional"}) == 2 * manifest.original.flops
    for head in range(k):
        assert get("cpcnn_head_activations_total", {"head": str(head)}) == 2
    assert get("cpcnn_heads_per_image_count") == 2
    assert get("cpcnn_heads_per_image_sum") == 2 * k
    assert get("cpcnn_batch_size_count", {"mode": "conditional"}) == 1
    assert get("cpcnn_batch_size_sum", {"mode": "conditional"}) == 2
    assert get("cpcnn_image_flops_count", {"mode": "conditional"}) == 2
    assert get("cpcnn_image_flops_sum", {"mode": "conditional"}) == 2 * all_heads
    assert get("cpcnn_stage_duration_seconds_count", {"stage": "trunk"}) == 1
    assert get("cpcnn_stage_duration_seconds_count", {"stage": "original"}) == 0
    r = client.post("/classify?mode=original", files=files(png()))
    assert get("cpcnn_flops_executed_total", {"mode": "original"}) == manifest.original.flops
    assert get("cpcnn_original_flops_total", {"mode": "original"}) == manifest.original.flops
    assert get("cpcnn_heads_per_image_count") == 2  # original mode runs no heads
    assert get("cpcnn_stage_duration_seconds_count", {"stage": "original"}) == 1
    client.post("/classify?tau=2", files=files(png()))  # a 422
    labels = {"endpoint": "/classify", "method": "POST"}
    assert get("cpcnn_requests_total", {**labels, "status": "200"}) == 2
    assert get("cpcnn_requests_total", {**labels, "status": "422"}) == 1
    assert get("cpcnn_request_duration_seconds_count", {"endpoint": "/classify"}) == 3
    assert get("cpcnn_in_flight_requests") == 0
    text = client.get("/metrics").text
    assert 'cpcnn_requests_total{endpoint="/classify",method="POST",status="200"} 2.0' in text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_metrics_pass_promtool(fresh, promtool):
    client, _ = fresh
    client.post("/classify", files=files(png(), png((1, 2, 3))))
    client.post("/classify?mode=original", content=png(), headers={"Content-Type": "image/png"})
    client.post("/classify", content=b"nope", headers={"Content-Type": "image/png"})
    result = promtool_check(promtool, client.get("/metrics").text)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y prometheus)")
    return path


def promtool_check(promtool, text):
    import subprocess

    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


# -- failures --------------------------------------------------------------------------------
def test_unexpected_error_is_a_generic_500(synthetic_package, caplog):
    app, registry = make_app(synthetic_package)
    with TestClient(app, raise_server_exceptions=False) as client:
        async def boom(*args, **kwargs):
            raise RuntimeError("secret internal detail /etc/passwd")

        app.state.service.classify = boom
        r = client.post("/classify", files=files(png()))
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error",
                                  "message": "internal server error; the incident was logged"}}
    assert "secret" not in r.text
    assert "secret internal detail" in caplog.text  # logged, with its traceback
    assert registry.get_sample_value(
        "cpcnn_requests_total", {"endpoint": "/classify", "method": "POST", "status": "500"}) == 1


def test_broken_package_refuses_to_start_with_a_clear_message(synthetic_package, tmp_path):
    broken = tmp_path / "pkg"
    shutil.copytree(synthetic_package, broken)
    with (broken / "head0.onnx").open("ab") as f:
        f.write(b"tampered")
    app, _ = make_app(broken)
    with pytest.raises(StartupError, match=r"sha256 mismatch for head0\.onnx"), TestClient(app):
        pass
    assert app.state.startup_error and "head0.onnx" in app.state.startup_error

    (broken / "manifest.json").write_text(json.dumps({"name": "x"}))
    app, _ = make_app(broken)
    with pytest.raises(StartupError, match="does not match the manifest schema"), TestClient(app):
        pass


# -- the /classify query: one model, validated by the route, documented as FastAPI would ------
@pytest.mark.parametrize("query, field", [("tau=2", "tau"), ("tau=nan", "tau"), ("top_k=0", "top_k"),
                                          ("top_k=1.5", "top_k"), ("mode=fast", "mode"),
                                          ("target_mflops=0", "target_mflops")])
def test_bad_classify_query_values_are_422_naming_the_parameter(served, query, field):
    client, _ = served
    r = client.post(f"/classify?{query}", content=png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 422, r.text
    body = r.json()["error"]
    assert body["code"] == "invalid_parameter" and field in body["message"], body


def test_classify_query_parameters_are_documented_with_their_constraints(served):
    from service.routes.classify import ClassifyQuery

    client, _ = served
    params = {p["name"]: p for p in
              client.get("/openapi.json").json()["paths"]["/classify"]["post"]["parameters"]}
    assert set(params) == set(ClassifyQuery.model_fields)
    assert all(p["in"] == "query" and not p["required"] and p["description"]
               for p in params.values())
    tau = next(s for s in params["tau"]["schema"]["anyOf"] if s["type"] == "number")
    assert (tau["minimum"], tau["maximum"]) == (0.0, 1.0)
    assert params["mode"]["schema"]["enum"] == ["conditional", "original"]
    # an unknown parameter is ignored, as FastAPI ignores undeclared query parameters
    r = client.post("/classify?colour=blue&tau=0.5", content=png(),
                    headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["tau"] == 0.5
