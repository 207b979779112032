"""The benchmark's own logic: the floor server answers what the runner computes, and the targets
are judged on the service's cells, never on the floor's (timings themselves are not tested)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench import floor_app
from bench.serve_bench import targets
from service.runner import PackageRunner
from tests.conftest import SHIPPED_PACKAGE


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["conditional", "original"])
def test_floor_server_answers_the_runners_prediction(monkeypatch, mode):
    monkeypatch.setenv("CPCNN_MODEL_DIR", str(SHIPPED_PACKAGE))
    monkeypatch.delenv("CPCNN_TAU", raising=False)
    runner = PackageRunner(SHIPPED_PACKAGE, verify=False)
    size = runner.manifest.input.size
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    with TestClient(floor_app.app) as client:
        assert client.get("/readyz").status_code == 200
        response = client.post(f"/classify?mode={mode}", content=_png(pixels),
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
    return {"batching": True, "inline_when_idle": True, "mode": mode, "concurrency": 1,
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
