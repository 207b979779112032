"""The Open Inference Protocol (KServe V2) endpoints: through the ASGI app, then with the official
``tritonclient.http`` client against a real uvicorn process."""

from __future__ import annotations

import base64
import gzip
import io
import json
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import make_app
from tests.test_service_server import free_port, start_server, stop

INFER = "/v2/models/{name}/infer"
OUTPUTS = ["probabilities", "top_k_indices", "top_k_scores", "labels"]


def image(seed: int, size=(48, 40)) -> Image.Image:
    """A deterministic noisy RGB image (not square, so preprocessing resizes and crops)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (1, 1, 3))
    noise = rng.integers(-40, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def bytes_request(*blobs: bytes, parameters=None, outputs=None, **extra) -> dict:
    req = {"inputs": [{"name": "image", "shape": [len(blobs)], "datatype": "BYTES",
                       "data": [b64(b) for b in blobs]}], **extra}
    if parameters is not None:
        req["parameters"] = parameters
    if outputs is not None:
        req["outputs"] = [{"name": o} for o in outputs]
    return req


def outputs_of(body: dict) -> dict[str, np.ndarray]:
    """JSON outputs as arrays of their declared shape."""
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}


def infer_url(manifest) -> str:
    return INFER.format(name=manifest.name)


def classify(client, blobs, **query) -> dict:
    r = client.post("/classify", params=query,
                    files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
    assert r.status_code == 200, r.text
    return r.json()


def assert_matches_classify(outputs: dict[str, np.ndarray], reference: dict, manifest) -> None:
    """V2 outputs carry the same top-k (indices, scores, names) as /classify for the same images."""
    k = reference["top_k"]
    n = len(reference["results"])
    assert outputs["top_k_indices"].shape == (n, k) and outputs["labels"].shape == (n, k)
    assert outputs["probabilities"].shape == (n, len(manifest.class_names))
    for i, res in enumerate(reference["results"]):
        preds = res["predictions"]
        assert outputs["top_k_indices"][i].tolist() == [p["index"] for p in preds]
        labels = [x.decode() if isinstance(x, bytes) else x for x in outputs["labels"][i]]
        assert labels == [p["class_name"] for p in preds]
        assert outputs["top_k_scores"][i] == pytest.approx([p["score"] for p in preds], rel=1e-5)
        probs = outputs["probabilities"][i]
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert probs[outputs["top_k_indices"][i]] == pytest.approx(outputs["top_k_scores"][i])


def assert_flops_parameters(params: dict, manifest, n: int, mode: str = "conditional") -> None:
    """flops_total = Σ over images of trunk + clustifier + Σ heads run (from the manifest)."""
    per_image = json.loads(params["flops"])
    assert len(per_image) == n
    if mode == "original":
        assert "heads" not in params and "tau" not in params
        expected = [manifest.original.flops] * n
    else:
        heads = json.loads(params["heads"])
        assert len(heads) == n
        expected = []
        for run in heads:
            assert sum(w for _, w in run) == pytest.approx(1.0)
            head_flops = sum(manifest.clusters[h].head.flops for h, _ in run)
            expected.append(manifest.trunk.flops + manifest.clustifier.flops + head_flops)
    assert [f["total"] for f in per_image] == expected
    assert params["flops_total"] == sum(expected)
    assert params["flops_original"] == n * manifest.original.flops
    assert params["flop_saving"] == pytest.approx(1 - sum(expected) / (n * manifest.original.flops))
    latency = json.loads(params["latency_ms"])
    assert latency["total"] > 0 and all(v >= 0 for v in latency.values())
    assert ("original" in latency) == (mode == "original")


# -- health and metadata -----------------------------------------------------------------------
def test_health_and_metadata(served, manifest):
    client, _ = served
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "cpcnn-serve" and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]
    for path in (f"/v2/models/{manifest.name}", f"/v2/models/{manifest.name}/versions/"
                                                f"{manifest.version}"):
        m = client.get(path).json()
        assert m["name"] == manifest.name and m["versions"] == [manifest.version]
        assert m["platform"] == "cpcnn"
        assert {(t["name"], t["datatype"]) for t in m["inputs"]} == {("image", "BYTES"),
                                                                     ("pixels", "UINT8")}
        assert [(t["name"], t["datatype"], t["shape"]) for t in m["outputs"]] == [
            ("probabilities", "FP32", [-1, len(manifest.class_names)]),
            ("top_k_indices", "INT64", [-1, -1]), ("top_k_scores", "FP32", [-1, -1]),
            ("labels", "BYTES", [-1, -1])]
    for path in (f"/v2/models/{manifest.name}/ready",
                 f"/v2/models/{manifest.name}/versions/{manifest.version}/ready"):
        r = client.get(path)
        assert r.status_code == 200 and r.json() == {"name": manifest.name, "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready",
                                  "/v2/models/{name}/versions/9.9/ready",
                                  "/v2/models/{name}/versions/9.9"])
def test_unknown_model_or_version_is_a_v2_404(served, manifest, path):
    client, _ = served
    r = client.get(path.format(name=manifest.name))
    assert r.status_code == 404
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    r = client.post(INFER.format(name="nope"), json=bytes_request(encode(image(0))))
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]


def test_unknown_path_and_method_answer_in_the_v2_shape(served, manifest):
    client, _ = served
    r = client.get(f"/v2/models/{manifest.name}/config")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = client.get(infer_url(manifest))
    assert r.status_code == 405 and isinstance(r.json()["error"], str)
    r = client.delete("/v2")
    assert r.status_code == 405 and isinstance(r.json()["error"], str)


def test_not_ready_before_load(synthetic_package, manifest):
    app, _ = make_app(synthetic_package)
    client = TestClient(app)  # no `with`: nothing loaded
    assert client.get("/v2/health/live").status_code == 200
    r = client.get("/v2/health/ready")
    assert r.status_code == 400 and r.json() == {"ready": False}  # V2: 4xx means false
    r = client.get(f"/v2/models/{manifest.name}/ready")
    assert r.status_code == 400 and r.json()["ready"] is False
    r = client.post(infer_url(manifest), json=bytes_request(encode(image(0))))
    assert r.status_code == 503 and isinstance(r.json()["error"], str)
    assert client.get(f"/v2/models/{manifest.name}").status_code == 503


# -- inference (JSON) --------------------------------------------------------------------------
def test_bytes_infer_matches_classify(served, manifest):
    client, _ = served
    blobs = [encode(image(1)), encode(image(2), "JPEG"), encode(image(3, (32, 32)))]
    r = client.post(infer_url(manifest), json=bytes_request(*blobs, parameters={"top_k": 3},
                                                            id="req-1"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert "total;dur=" in r.headers["server-timing"]
    body = r.json()
    assert body["model_name"] == manifest.name and body["model_version"] == manifest.version
    assert body["id"] == "req-1"
    assert [o["name"] for o in body["outputs"]] == OUTPUTS
    assert [o["datatype"] for o in body["outputs"]] == ["FP32", "INT64", "FP32", "BYTES"]
    params = body["parameters"]
    assert params["mode"] == "conditional" and params["tau"] == manifest.activator.default_tau
    assert params["top_k"] == 3
    assert_flops_parameters(params, manifest, 3)
    assert_matches_classify(outputs_of(body), classify(client, blobs, top_k=3), manifest)


def test_pixels_infer_matches_classify(served, manifest):
    """Decoded pixels of any size are prepared like an uploaded file of the same pixels."""
    client, _ = served
    s = manifest.input.size
    for size in ((48, 40), (s, s)):
        imgs = [image(4, size), image(5, size)]
        pixels = np.stack([np.asarray(im) for im in imgs])  # (N, H, W, 3)
        reference = classify(client, [encode(im) for im in imgs], top_k=4, tau=0.9)
        for data in (pixels.ravel().tolist(), pixels.tolist()):  # flat and nested
            req = {"parameters": {"top_k": 4, "tau": 0.9},
                   "inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                               "data": data}]}
            r = client.post(infer_url(manifest), json=req)
            assert r.status_code == 200, r.text
            assert_matches_classify(outputs_of(r.json()), reference, manifest)
            assert_flops_parameters(r.json()["parameters"], manifest, 2)
            assert json.loads(r.json()["parameters"]["latency_ms"])["decode"] == 0


def test_tau_mode_top_k_and_requested_outputs(served, manifest):
    client, _ = served
    blobs = [encode(image(i)) for i in range(4)]
    url = infer_url(manifest)
    k = manifest.num_clusters
    # τ = 0: one head per image; τ = 1: every head
    one = client.post(url, json=bytes_request(*blobs, parameters={"tau": 0})).json()["parameters"]
    assert one["tau"] == 0 and all(len(run) == 1 for run in json.loads(one["heads"]))
    assert_flops_parameters(one, manifest, 4)
    every = client.post(url, json=bytes_request(*blobs, parameters={"tau": 1.0})).json()
    runs = json.loads(every["parameters"]["heads"])
    assert all(sorted(h for h, _ in run) == list(range(k)) for run in runs)
    all_heads = manifest.shared_flops() + sum(c.head.flops for c in manifest.clusters)
    assert every["parameters"]["flops_total"] == 4 * all_heads
    # mode=original: the baseline, no τ and no heads
    r = client.post(url, json=bytes_request(*blobs[:2], parameters={"mode": "original", "tau": 0.3}))
    params = r.json()["parameters"]
    assert params["mode"] == "original"
    assert_flops_parameters(params, manifest, 2, mode="original")
    assert_matches_classify(outputs_of(r.json()), classify(client, blobs[:2], mode="original"),
                            manifest)
    # top_k beyond the classes is clamped; only the requested outputs, in the requested order
    r = client.post(url, json=bytes_request(blobs[0], parameters={"top_k": 10_000},
                                            outputs=["labels", "top_k_indices"]))
    body = r.json()
    assert [o["name"] for o in body["outputs"]] == ["labels", "top_k_indices"]
    c = len(manifest.class_names)
    assert body["parameters"]["top_k"] == c and body["outputs"][1]["shape"] == [1, c]
    assert sorted(body["outputs"][1]["data"]) == list(range(c))
    # the default top_k is the server's
    r = client.post(url, json=bytes_request(blobs[0], outputs=["top_k_scores"]))
    assert r.json()["outputs"][0]["shape"] == [1, 5]
    # [N, 1] BYTES is accepted too
    req = {"inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES",
                       "data": [[b64(blobs[0])], [b64(blobs[1])]]}]}
    assert client.post(url, json=req).status_code == 200


# -- inference (binary tensor data extension) --------------------------------------------------
def test_binary_request_and_response(served, manifest):
    """Raw bytes after the JSON header, as tritonclient sends them, built by hand."""
    client, _ = served
    blobs = [encode(image(6)), encode(image(7))]
    data = b"".join(len(b).to_bytes(4, "little") + b for b in blobs)
    header = json.dumps({
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "top_k_indices", "parameters": {"binary_data": True}},
                    {"name": "labels", "parameters": {"binary_data": True}},
                    {"name": "top_k_scores"}],
        "parameters": {"top_k": 2}}).encode()
    r = client.post(infer_url(manifest), content=header + data,
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    body, rest = json.loads(r.content[:n]), r.content[n:]
    indices_out, labels_out, scores_out = body["outputs"]
    assert "data" not in indices_out and indices_out["parameters"]["binary_data_size"] == 2 * 2 * 8
    indices = np.frombuffer(rest[:32], dtype="<i8").reshape(2, 2)
    labels, pos = [], 32
    while pos < len(rest):
        length = int.from_bytes(rest[pos:pos + 4], "little")
        labels.append(rest[pos + 4:pos + 4 + length].decode())
        pos += 4 + length
    assert len(rest) == 32 + labels_out["parameters"]["binary_data_size"]
    assert scores_out["data"] and "parameters" not in scores_out  # JSON, as asked
    reference = classify(client, blobs, top_k=2)
    assert indices.tolist() == [[p["index"] for p in res["predictions"]]
                                for res in reference["results"]]
    assert labels == [p["class_name"] for res in reference["results"] for p in res["predictions"]]
    # binary pixels, all outputs binary by request-level binary_data_output
    pixels = np.stack([np.asarray(image(8)), np.asarray(image(9))])
    header = json.dumps({
        "inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                    "parameters": {"binary_data_size": pixels.nbytes}}],
        "parameters": {"binary_data_output": True}}).encode()
    r = client.post(infer_url(manifest), content=header + pixels.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    body = json.loads(r.content[:n])
    assert [o["name"] for o in body["outputs"]] == OUTPUTS
    assert len(r.content) - n == sum(o["parameters"]["binary_data_size"] for o in body["outputs"])


# -- errors ------------------------------------------------------------------------------------
def _image_input(**fields) -> dict:
    return {"name": "image", "shape": [1], "datatype": "BYTES",
            "data": [b64(encode(image(0)))], **fields}


BAD_REQUESTS = {
    "wrong datatype": ({"inputs": [_image_input(datatype="FP32")]}, "datatype BYTES"),
    "pixels as BYTES": ({"inputs": [_image_input(name="pixels")]}, "datatype UINT8"),
    "unknown input": ({"inputs": [_image_input(name="img")]}, "unknown input 'img'"),
    "missing input": ({"inputs": []}, "got 0 inputs"),
    "two inputs": ({"inputs": [_image_input(), _image_input()]}, "got 2 inputs"),
    "no inputs field": ({"outputs": []}, "inputs"),
    "shape mismatch": ({"inputs": [_image_input(shape=[2])]}, "shape [2] but 1 data"),
    "bad shape": ({"inputs": [_image_input(shape=[1, 2])]}, "shape [N] or [N, 1]"),
    "negative shape": ({"inputs": [_image_input(shape=[-1])]}, "greater than or equal to 0"),
    "bad base64": ({"inputs": [_image_input(data=["not base64!"])]}, "not valid base64"),
    "number as BYTES": ({"inputs": [_image_input(data=[3])]}, "must be a base64 string"),
    "not an image": ({"inputs": [_image_input(data=[b64(b"hello")])]}, "not an image"),
    "empty image": ({"inputs": [_image_input(data=[""])]}, "is empty"),
    "no data": ({"inputs": [_image_input(data=None)]}, "neither 'data'"),
    "tau above 1": ({"inputs": [_image_input()], "parameters": {"tau": 2}}, "tau"),
    "tau negative": ({"inputs": [_image_input()], "parameters": {"tau": -0.1}}, "tau"),
    "tau string": ({"inputs": [_image_input()], "parameters": {"tau": "0.5"}}, "tau"),
    "tau bool": ({"inputs": [_image_input()], "parameters": {"tau": True}}, "tau"),
    "unknown mode": ({"inputs": [_image_input()], "parameters": {"mode": "fast"}}, "mode"),
    "top_k zero": ({"inputs": [_image_input()], "parameters": {"top_k": 0}}, "top_k"),
    "top_k float": ({"inputs": [_image_input()], "parameters": {"top_k": 2.5}}, "top_k"),
    "parameter list": ({"inputs": [_image_input()], "parameters": {"tau": [1]}}, "parameters"),
    "unknown output": ({"inputs": [_image_input()], "outputs": [{"name": "logits"}]},
                       "unknown output 'logits'"),
    "output twice": ({"inputs": [_image_input()],
                      "outputs": [{"name": "labels"}, {"name": "labels"}]}, "twice"),
    "classification": ({"inputs": [_image_input()],
                        "outputs": [{"name": "labels", "parameters": {"classification": 3}}]},
                       "classification"),
    "binary_data not bool": ({"inputs": [_image_input()],
                              "outputs": [{"name": "labels", "parameters": {"binary_data": 1}}]},
                             "binary_data"),
    "pixels bad shape": ({"inputs": [{"name": "pixels", "shape": [1, 2, 2, 4], "datatype": "UINT8",
                                      "data": [0] * 16}]}, "[N, H, W, 3]"),
    "pixels count": ({"inputs": [{"name": "pixels", "shape": [1, 2, 2, 3], "datatype": "UINT8",
                                  "data": [0] * 11}]}, "but 11 data values"),
    "pixels range": ({"inputs": [{"name": "pixels", "shape": [1, 1, 1, 3], "datatype": "UINT8",
                                  "data": [0, 256, 0]}]}, "[0, 255]"),
    "pixels float": ({"inputs": [{"name": "pixels", "shape": [1, 1, 1, 3], "datatype": "UINT8",
                                  "data": [0.5, 1, 2]}]}, "[0, 255]"),
    "pixels ragged": ({"inputs": [{"name": "pixels", "shape": [1, 1, 2, 3], "datatype": "UINT8",
                                   "data": [[[[1, 2, 3], [4, 5]]]]}]}, "list of integers"),
    "id not a string": ({"id": 42, "inputs": [_image_input()]}, "id"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_400_in_the_v2_shape(served, manifest, case):
    client, _ = served
    req, message = BAD_REQUESTS[case]
    r = client.post(infer_url(manifest), json=req)
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert message in body["error"]


@pytest.mark.parametrize("content, headers, message", [
    (b"{not json", {}, "not valid JSON"),
    (b"", {}, "no JSON inference request"),
    (b"[1, 2]", {}, "invalid inference request"),
    (b'{"inputs": [], "parameters": {"tau": NaN}}', {}, "tau"),
    (b"[" * 100_000, {}, "not valid JSON"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "x"}, "Inference-Header-Content-Length"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "0" * 5000 + "14"},
     "at most 18 ASCII digits"),  # int() refuses > 4,300 digits: was a 500
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "\u00b9\u00b2".encode("latin-1")},
     "at most 18 ASCII digits"),  # '¹²'.isdigit() is True, int('¹²') raises: was a 500
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", '
     b'"parameters": {"binary_data_size": 3}}]}', {}, "no Inference-Header-Content-Length"),
    (b"\x00\x00", {"Content-Encoding": "gzip"}, "could not be decompressed"),
])
def test_malformed_bodies_are_400(served, manifest, content, headers, message):
    client, _ = served
    r = client.post(infer_url(manifest), content=content, headers=headers)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_binary_size_mismatches_are_400(served, manifest):
    client, _ = served

    def send(inputs, data):
        header = json.dumps({"inputs": inputs}).encode()
        return client.post(infer_url(manifest), content=header + data,
                           headers={"Inference-Header-Content-Length": str(len(header))})

    blob = encode(image(0))
    good = len(blob).to_bytes(4, "little") + blob
    image_input = {"name": "image", "shape": [1], "datatype": "BYTES"}
    for size, data, message in [(len(good) + 1, good, "declares binary_data_size"),
                                (3, good[:3], "ends inside the 4-byte length"),
                                (len(good) - 1, good[:-1], "declares"),
                                (len(good) * 2, good * 2, "holds 2 elements")]:
        r = send([{**image_input, "parameters": {"binary_data_size": size}}], data)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    r = send([{**image_input, "data": [b64(blob)]}], b"xyz")
    assert r.status_code == 400 and "no input declares" in r.json()["error"]
    r = send([{**image_input, "data": [b64(blob)], "parameters": {"binary_data_size": 3}}], b"xyz")
    assert r.status_code == 400 and "both 'data' and binary_data_size" in r.json()["error"]
    pixels = {"name": "pixels", "shape": [1, 4, 4, 3], "datatype": "UINT8",
              "parameters": {"binary_data_size": 47}}
    r = send([pixels], bytes(47))
    assert r.status_code == 400 and "48 bytes" in r.json()["error"]


def test_limits_are_413(synthetic_package, manifest):
    app, _ = make_app(synthetic_package, max_body_bytes=20_000, max_files=2)
    with TestClient(app) as client:
        url = infer_url(manifest)
        blob = encode(image(0, (8, 8)))
        r = client.post(url, json=bytes_request(blob, blob, blob))
        assert r.status_code == 413 and "CPCNN_MAX_FILES" in r.json()["error"]
        r = client.post(url, json=bytes_request(encode(image(0, (200, 200)))))
        assert r.status_code == 413 and "CPCNN_MAX_BODY_BYTES" in r.json()["error"]
        # a small gzip body that inflates past the limit
        req = json.dumps(bytes_request(blob) | {"padding": "x" * 50_000}).encode()
        r = client.post(url, content=gzip.compress(req), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "CPCNN_MAX_BODY_BYTES" in r.json()["error"]
        r = client.post(url, content=b"{}", headers={"Content-Encoding": "br"})
        assert r.status_code == 415 and isinstance(r.json()["error"], str)
    app, _ = make_app(synthetic_package, max_image_pixels=2000)
    with TestClient(app) as client:
        req = {"inputs": [{"name": "pixels", "shape": [1, 50, 50, 3], "datatype": "UINT8",
                           "data": [0] * 7500}]}
        r = client.post(infer_url(manifest), json=req)
        assert r.status_code == 413 and "CPCNN_MAX_IMAGE_PIXELS" in r.json()["error"]


def test_unexpected_error_is_a_generic_v2_500(synthetic_package, manifest, caplog):
    app, registry = make_app(synthetic_package)
    with TestClient(app, raise_server_exceptions=False) as client:
        async def boom(*args, **kwargs):
            raise RuntimeError("secret internal detail")

        app.state.service.classify = boom
        r = client.post(infer_url(manifest), json=bytes_request(encode(image(0))))
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error; the incident was logged"}
    assert "secret internal detail" in caplog.text


# -- metrics -----------------------------------------------------------------------------------
def test_v2_requests_are_counted_by_route_template(fresh, manifest):
    client, registry = fresh
    get = registry.get_sample_value
    url = infer_url(manifest)
    assert client.post(url, json=bytes_request(encode(image(0)), encode(image(1)))).status_code == 200
    assert client.post(url, json={"inputs": []}).status_code == 400
    client.get("/v2/models/nope")
    client.get("/v2/whatever/123")
    labels = {"endpoint": "/v2/models/{name}/infer", "method": "POST"}
    assert get("cpcnn_requests_total", {**labels, "status": "200"}) == 1
    assert get("cpcnn_requests_total", {**labels, "status": "400"}) == 1
    assert get("cpcnn_requests_total", {"endpoint": "/v2/models/{name}", "method": "GET",
                                        "status": "404"}) == 1
    assert get("cpcnn_requests_total", {"endpoint": "/v2/{path:path}", "method": "GET",
                                        "status": "404"}) == 1
    pixels = {"name": "pixels", "shape": [3, 8, 8, 3], "datatype": "UINT8", "data": [7] * 576}
    assert client.post(url, json={"inputs": [pixels]}).status_code == 200
    assert get("cpcnn_images_total", {"mode": "conditional"}) == 5  # both inputs are counted
    assert get("cpcnn_batch_size_count", {"mode": "conditional"}) == 2
    assert get("cpcnn_batch_size_sum", {"mode": "conditional"}) == 5
    assert get("cpcnn_stage_duration_seconds_count", {"stage": "trunk"}) == 2
    assert 'endpoint="/v2/models/synthetic' not in client.get("/metrics").text  # no raw paths


def test_openapi_documents_v2(served):
    client, _ = served
    spec = client.get("/openapi.json").json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert "application/json" in infer["requestBody"]["content"]
    assert {"InferenceResponse", "ModelMetadata", "V2Error"} <= set(spec["components"]["schemas"])


# -- the official client against a real server -------------------------------------------------
@pytest.fixture(scope="module")
def triton(synthetic_package):
    """(tritonclient.http.InferenceServerClient, base URL) on a uvicorn process."""
    httpclient = pytest.importorskip("tritonclient.http")
    port = free_port()
    proc = start_server(synthetic_package, port)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{stop(proc)}")
            try:
                if client.is_server_ready():
                    break
            except Exception:  # connection refused while uvicorn starts
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after 120 s:\n{stop(proc)}")
            time.sleep(0.2)
        yield client, f"http://127.0.0.1:{port}"
    finally:
        client.close()
        stop(proc)


def test_tritonclient_health_and_metadata(triton, manifest):
    from tritonclient.utils import InferenceServerException

    client, _ = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(manifest.name)
    assert client.is_model_ready(manifest.name, manifest.version)
    assert not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(manifest.name)
    assert meta["name"] == manifest.name and meta["versions"] == [manifest.version]
    assert [o["name"] for o in meta["outputs"]] == OUTPUTS
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404" and "unknown model 'nope'" in e.value.message()


def test_tritonclient_infer_bytes(triton, manifest):
    import tritonclient.http as httpclient

    client, base = triton
    blobs = [encode(image(10)), encode(image(11), "JPEG"), encode(image(12))]
    inp = httpclient.InferInput("image", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))  # binary by default
    names = ["top_k_indices", "top_k_scores", "labels", "probabilities"]
    result = client.infer(manifest.name, inputs=[inp], request_id="t-1",
                          outputs=[httpclient.InferRequestedOutput(n) for n in names],
                          parameters={"tau": 0.9, "top_k": 3})
    outputs = {n: result.as_numpy(n) for n in names}
    assert outputs["top_k_indices"].dtype == np.int64 and outputs["top_k_scores"].dtype == np.float32
    assert outputs["labels"].shape == (3, 3) and outputs["probabilities"].dtype == np.float32
    response = result.get_response()
    assert response["id"] == "t-1" and response["model_name"] == manifest.name
    params = response["parameters"]
    assert params["tau"] == 0.9 and params["top_k"] == 3
    assert_flops_parameters(params, manifest, 3)
    with httpx.Client(base_url=base, timeout=30) as http:
        reference = classify(http, blobs, top_k=3, tau=0.9)
    assert_matches_classify(outputs, reference, manifest)


def test_tritonclient_infer_pixels(triton, manifest):
    import tritonclient.http as httpclient

    client, base = triton
    imgs = [image(13, (56, 40)), image(14, (56, 40))]
    pixels = np.stack([np.asarray(im) for im in imgs])  # (2, 40, 56, 3)
    inp = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    result = client.infer(manifest.name, inputs=[inp])  # no outputs: all, binary
    assert result.as_numpy("probabilities").shape == (2, len(manifest.class_names))
    assert result.as_numpy("top_k_indices").shape == (2, 5)  # the server's default top_k
    with httpx.Client(base_url=base, timeout=30) as http:
        reference = classify(http, [encode(im) for im in imgs])
    assert_matches_classify({n: result.as_numpy(n) for n in OUTPUTS}, reference, manifest)
    assert_flops_parameters(result.get_response()["parameters"], manifest, 2)
    # JSON outputs, gzip-compressed request and response, original mode
    result = client.infer(
        manifest.name, inputs=[inp], parameters={"mode": "original"},
        outputs=[httpclient.InferRequestedOutput("labels", binary_data=False)],
        request_compression_algorithm="gzip", response_compression_algorithm="gzip")
    assert result.as_numpy("labels").shape == (2, 5)
    assert_flops_parameters(result.get_response()["parameters"], manifest, 2, mode="original")


def test_tritonclient_errors(triton, manifest):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client, _ = triton
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer(manifest.name, inputs=[inp])
    assert e.value.status() == "400" and "not an image" in e.value.message()
    inp.set_data_from_numpy(np.array([encode(image(0))], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer(manifest.name, inputs=[inp], parameters={"tau": 3.0})
    assert e.value.status() == "400" and "tau" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer(manifest.name, inputs=[inp],
                     outputs=[httpclient.InferRequestedOutput("logits")])
    assert e.value.status() == "400" and "unknown output" in e.value.message()
