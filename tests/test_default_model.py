"""The shipped default model (models/tiny-imagenet-200): what `make serve` serves on a fresh clone.

Checks the package the way a user's first request relies on it: schema and checksums, every ONNX
file through the ONNX checker, the size budget, the model card agreeing with the manifest, and one
real image from the repository classified to its class through the app.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from export.card import CARD, sweep_table
from modelpack.manifest import default_model_dir, load_manifest
from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "tiny-imagenet-200"
EXAMPLE = ROOT / "docs" / "examples" / "tiny-imagenet-goldfish.png"
MAX_PACKAGE_BYTES = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(DEFAULT)  # schema, every file present, every sha256


def test_it_is_what_make_serve_serves():
    assert default_model_dir().resolve() == DEFAULT.resolve()


def test_every_onnx_file_passes_the_checker(manifest):
    for component in manifest.components().values():
        onnx.checker.check_model(str(DEFAULT / component.file), full_check=True)


def test_package_fits_the_size_budget():
    size = sum(p.stat().st_size for p in DEFAULT.iterdir() if p.is_file())
    assert size <= MAX_PACKAGE_BYTES, f"{size / 2**20:.1f} MiB"


def test_card_states_the_manifests_figures(manifest):
    card = (DEFAULT / CARD).read_text()
    assert manifest.extra_files[CARD]  # listed, so its sha256 was verified above
    for line in sweep_table(manifest.tau_sweep, manifest.num_clusters,
                            manifest.activator.default_tau):
        assert line in card
    assert manifest.activator.default_tau_reason and manifest.activator.default_tau_reason in card
    acc = manifest.training.original_accuracy
    assert f"{100 * acc.top1:.2f}%" in card and f"{100 * acc.top5:.2f}%" in card
    for cluster in manifest.clusters:
        assert f"| {cluster.index} | {len(cluster.classes)} |" in card
    assert manifest.training.num_classes == 200 and len(manifest.class_names) == 200


def test_the_readme_example_image_is_classified_as_its_class(manifest):
    app = create_app(Settings(model_dir=DEFAULT), registry=CollectorRegistry())
    with TestClient(app) as client:
        r = client.post("/classify?top_k=5", files={"file": (EXAMPLE.name, EXAMPLE.read_bytes(),
                                                            "image/png")})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["predictions"][0]["class_name"].startswith("goldfish")
    assert 0 < result["flops"]["total"] < result["flops"]["original"]
