"""The two backends on the shipped synthetic package: OpenVINO fp32 computes what ONNX Runtime
computes, bf16 keeps top-1, and the runner, the choice of backend and the service see no other
difference."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from modelpack import backend_choice as backends
from modelpack.backend import RunnerOptions
from modelpack.backend_choice import choose_backend
from modelpack.runner import PackageRunner, normalize
from tests.conftest import SHIPPED_PACKAGE

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed "
                                            "(pip install 'cpcnn-serve[openvino]')")
from modelpack import openvino_backend  # noqa: E402

OV_FP32 = RunnerOptions(backend="openvino", precision="fp32")
OV_BF16 = RunnerOptions(backend="openvino", precision="bf16")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Images of every synthetic class, many per class (the bf16 agreement is a rate)."""
    from training.data.synthetic import make_synthetic

    data = make_synthetic(superclasses=4, classes_per_super=3, per_class=25, image_size=32,
                          noise=0.75, seed=3)
    return data.images  # (300, 32, 32, 3) uint8


@pytest.fixture(scope="module")
def runners() -> dict[str, PackageRunner]:
    return {"ort": PackageRunner(SHIPPED_PACKAGE, verify=False),
            "fp32": PackageRunner(SHIPPED_PACKAGE, OV_FP32, verify=False),
            "bf16": PackageRunner(SHIPPED_PACKAGE, OV_BF16, verify=False)}


def test_openvino_fp32_logits_equal_onnx_runtime_within_1e4(images, runners):
    ort_runner, ov_runner = runners["ort"], runners["fp32"]
    x = normalize(images, ort_runner.manifest.input)
    a_features, a_out, _ = ort_runner.backend.shared(x)
    b_features, b_out, _ = ov_runner.backend.shared(x)
    np.testing.assert_allclose(b_features, a_features, rtol=0, atol=1e-4)
    assert len(a_out) == len(b_out) >= 1
    for a, b in zip(a_out, b_out, strict=True):  # cluster logits (and class logits)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    for h in range(ort_runner.manifest.num_clusters):
        np.testing.assert_allclose(ov_runner.backend.head(h, a_features),
                                   ort_runner.backend.head(h, a_features), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ov_runner.backend.original(x), ort_runner.backend.original(x),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("tau", [0.0, 0.7, 1.0])
def test_openvino_fp32_routes_and_scores_as_onnx_runtime(images, runners, tau):
    a, b = runners["ort"].run(images, tau), runners["fp32"].run(images, tau)
    assert len({p.activation.heads[0] for p in a.predictions}) > 1  # heads ran on subsets
    for pa, pb in zip(a.predictions, b.predictions, strict=True):
        assert pa.activation.heads == pb.activation.heads and pa.flops == pb.flops
        np.testing.assert_allclose(pb.scores, pa.scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tau", [0.0, 0.7, 1.0])
def test_openvino_bf16_agrees_on_top1_for_99_percent(images, runners, tau):
    if runners["bf16"].backend.precision != "bf16":
        pytest.skip("this CPU has no bf16 instructions: OpenVINO computes in fp32 here")
    a, b = runners["ort"].run(images, tau), runners["bf16"].run(images, tau)
    agree = np.mean([pa.scores.argmax() == pb.scores.argmax()
                     for pa, pb in zip(a.predictions, b.predictions, strict=True)])
    assert agree >= 0.99
    a, b = runners["ort"].run_original(images), runners["bf16"].run_original(images)
    assert np.mean([pa.scores.argmax() == pb.scores.argmax()
                    for pa, pb in zip(a.predictions, b.predictions, strict=True)]) >= 0.99
    assert any(not np.allclose(pa.scores, pb.scores, atol=1e-4)  # bf16 really computed
               for pa, pb in zip(a.predictions, b.predictions, strict=True))


def test_openvino_timings_name_the_fused_stage(images, runners):
    """Trunk and clustifier run as one compiled model: ``trunk`` covers both, no clustifier."""
    timings = runners["fp32"].run(images[:4], 0.7).timings
    assert set(timings) == {"trunk", "activator", "heads", "combine"}
    assert all(v >= 0 for v in timings.values())


def test_openvino_runs_batches_of_every_size_and_from_several_threads(images, runners):
    """Infer requests are kept per batch size and never shared by two threads at once: batches
    of mixed sizes from four threads get exactly the answers of one thread."""
    runner = runners["fp32"]
    sizes = [1, 3, 7, 1, 16, 3, 32, 5]
    chunks = [images[i:i + n] for i, n in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)]
    want = [runner.run(c, 0.7) for c in chunks]
    got: dict[int, object] = {}

    def work(k: int) -> None:
        for _ in range(3):
            got[k] = runner.run(chunks[k], 0.7)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, w in enumerate(want):
        for pa, pb in zip(w.predictions, got[k].predictions, strict=True):
            np.testing.assert_array_equal(pa.scores, pb.scores)
    assert {1, 3, 7, 16, 32} <= set(runner.backend._shared._idle)  # noqa: SLF001


def test_warm_up_covers_every_batch_size_on_openvino_only(runners):
    assert runners["fp32"].backend.warm_sizes(4) == [1, 2, 3, 4]
    assert runners["ort"].backend.warm_sizes(4) == [1]


def test_auto_picks_openvino_where_the_cpu_computes_bf16(monkeypatch):
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda: True)
    assert choose_backend(RunnerOptions(backend="auto")) == "openvino"
    gpu = RunnerOptions(backend="auto", providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert choose_backend(gpu) == "onnxruntime"  # a GPU asked for: ONNX Runtime's CUDA provider
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda: False)
    assert choose_backend(RunnerOptions(backend="auto")) == "onnxruntime"
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda: True)
    assert choose_backend(RunnerOptions(backend="auto")) == "onnxruntime"
    assert choose_backend(RunnerOptions(backend="openvino")) == "openvino"  # asked for: kept


def test_openvino_asked_for_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'cpcnn-serve\[openvino\]'"):
        PackageRunner(SHIPPED_PACKAGE, RunnerOptions(backend="openvino"), verify=False)


def test_bf16_on_a_cpu_without_it_is_fp32_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="modelpack.openvino_backend"):
        assert openvino_backend.resolve_precision("bf16") == "fp32"
    assert "no bf16 instructions" in caplog.text
    assert openvino_backend.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda: True)
    assert openvino_backend.resolve_precision("auto") == "bf16"
    assert openvino_backend.resolve_precision("fp32") == "fp32"


def test_the_service_says_which_backend_serves(tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_dir=SHIPPED_PACKAGE, backend="openvino", precision="fp32"))
    with TestClient(app) as client:
        info = client.get("/v1/model").json()["backend"]
        assert info == {"name": "openvino", "precision": "fp32", "providers": ["CPU"]}
        metrics = client.get("/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("cpcnn_model_info{"))
        assert 'backend="openvino"' in line and 'precision="fp32"' in line
        import io

        from PIL import Image
        body = io.BytesIO()
        Image.new("RGB", (32, 32), (120, 30, 200)).save(body, format="PNG")
        r = client.post("/classify", content=body.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200
        latency = r.json()["results"][0]["latency"]
        assert latency["trunk"] > 0 and latency["clustifier"] is None
