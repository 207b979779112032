"""Training under torchrun: 2 processes (gloo on the CPU) train the synthetic pipeline into a
package that validates and whose accuracy is that of the one-process run within a tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.launch import free_port
from modelpack.manifest import load_manifest
from tests.conftest import ROOT, TEST_OVERRIDES

pytestmark = pytest.mark.slow

# 240 validation images: one image is 0.42 points. Two processes take the same global batches
# but BatchNorm sees half a batch each, so the runs differ by a few images.
TOLERANCE = 0.06


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torchrun")
    overrides = [*TEST_OVERRIDES, f'run_dir="{run_dir}"', f'package.out_dir="{run_dir / "package"}"',
                 "threads=1"]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "training", "run", "--config",
            str(ROOT / "configs" / "synthetic.toml")]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exported = subprocess.run([sys.executable, "-m", "export", "package", str(run_dir)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)
    assert exported.returncode == 0, exported.stderr[-3000:]
    return run_dir, done.stderr


def test_two_processes_train_one_package(two_process_run, synthetic_package):
    run_dir, log = two_process_run
    assert "rank 0 of 2 (gloo)" in log  # really distributed (rank 1 logs warnings only)
    m = load_manifest(run_dir / "package", verify=True)  # schema, files and checksums
    one = load_manifest(synthetic_package)
    assert m.num_clusters >= 2 and len(m.class_names) == len(one.class_names)
    assert abs(m.training.original_accuracy.top1 - one.training.original_accuracy.top1) <= TOLERANCE
    row = {r.tau: r for r in m.tau_sweep}
    one_row = {r.tau: r for r in one.tau_sweep}
    for tau in (0.0, 1.0):  # the sweep always holds both ends
        assert abs(row[tau].top1 - one_row[tau].top1) <= TOLERANCE
    # Rank 0 alone wrote the run's files: one config, one checkpoint per trained network.
    assert json.loads((run_dir / "config.json").read_text())["run_dir"] == str(run_dir)
    assert (run_dir / "original.pt").exists() and (run_dir / "clustifier.pt").exists()
