"""Shared fixtures: one small CP-CNN package trained end to end on the synthetic dataset.

Building it (train → cluster → clustifier → heads, then export → τ sweep → card) is the
end-to-end test of the pipeline; the service tests reuse the same package so the suite trains it once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people, not test logs

from training.config import load_config  # noqa: E402
from training.pipeline import Run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PACKAGE = ROOT / "models" / "synthetic"  # committed: tests that need no training use it

# The shipped synthetic config, trimmed so the whole pipeline runs in well under a minute.
TEST_OVERRIDES = [
    "original.epochs=6",
    "clustifier_optim.epochs=3",
    "head_optim.epochs=3",
    'head_family=[{name="original"}, {name="bottleneck2", replace=["bottleneck", "bottleneck"], mid_ratio=0.5}]',
]


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Run:
    run_dir = tmp_path_factory.mktemp("synthetic-run")
    cfg = load_config(ROOT / "configs" / "synthetic.toml",
                      [*TEST_OVERRIDES, f'run_dir="{run_dir}"', f'package.out_dir="{run_dir / "package"}"'])
    run = Run(cfg)
    run.run()
    return run


@pytest.fixture(scope="session")
def synthetic_package(synthetic_run: Run) -> Path:
    """The run exported (graphs, timed head choice, τ sweep, card): ``python -m export package``."""
    from export.build import build_package

    artifacts = synthetic_run.artifacts()
    build_package(artifacts)
    return artifacts.package_dir


# -- the service on the synthetic package: shared by the service test modules ------------------
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_app(package, **overrides):
    """A new app on ``package`` with its own metrics registry and the test admin token."""
    from prometheus_client import CollectorRegistry

    from service.app import create_app
    from service.settings import Settings

    registry = CollectorRegistry()
    settings = Settings(model_dir=package, admin_token=TOKEN, **overrides)
    return create_app(settings, registry=registry), registry


@pytest.fixture(scope="module")
def manifest(synthetic_package):
    from modelpack.manifest import load_manifest

    return load_manifest(synthetic_package)


@pytest.fixture(scope="module")
def served(synthetic_package):
    """One started app for a module's read-mostly tests: (client, registry)."""
    from fastapi.testclient import TestClient

    app, registry = make_app(synthetic_package)
    with TestClient(app) as client:
        yield client, registry


@pytest.fixture
def fresh(synthetic_package):
    """A new started app (own registry) for tests that read metrics exactly or change τ."""
    from fastapi.testclient import TestClient

    app, registry = make_app(synthetic_package)
    with TestClient(app) as client:
        yield client, registry


@pytest.fixture
def thread_hops(monkeypatch) -> list[str]:
    """The names of the functions the code under test hands to worker threads
    (``anyio.to_thread.run_sync``), in order; ``monkeypatch.undo()`` stops the counting."""
    import anyio.to_thread

    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):
        hops.append(getattr(getattr(fn, "func", fn), "__name__", ""))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return hops
