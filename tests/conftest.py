"""Shared fixtures: one small CP-CNN package trained end to end on the synthetic dataset.

Building it (train → cluster → clustifier → heads → export → τ sweep) is the end-to-end test of
the pipeline; the service tests reuse the same package so the suite trains it once.
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
    return synthetic_run.package_dir()
