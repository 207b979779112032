"""End to end on the synthetic dataset: train → Algorithm 2 → heads → export → τ sweep."""

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from service.manifest import load_manifest
from service.runner import PackageRunner
from training.pipeline import STAGES

pytestmark = pytest.mark.slow


def test_clusters_match_planted_superclasses(synthetic_run):
    clusters = json.loads((synthetic_run.dir / "clusters.json").read_text())["clusters"]
    per_super = synthetic_run.cfg.data.synthetic_classes_per_super
    n = synthetic_run.dataset.num_classes
    truth = np.arange(n) // per_super
    pred = np.zeros(n, dtype=int)
    for i, members in enumerate(clusters):
        pred[members] = i
    assert adjusted_rand_score(truth, pred) >= 0.9
    assert (synthetic_run.dir / "cluster_sizes.png").stat().st_size > 0


def test_every_stage_left_its_artifact(synthetic_run):
    assert all(synthetic_run.done(s) for s in STAGES)
    heads = json.loads((synthetic_run.dir / "heads.json").read_text())
    k = len(synthetic_run.load_clusters())
    assert len(heads["chosen"]) == k
    assert len(heads["candidates"]) == 2 * k  # every family member trained for every cluster
    for chosen in heads["chosen"]:
        same = [c for c in heads["candidates"] if c["cluster"] == chosen["cluster"]]
        best = max(c["accuracy"] for c in same)
        ok = [c for c in same if c["accuracy"] >= best - synthetic_run.cfg.head_tolerance]
        assert chosen["flops"] == min(c["flops"] for c in ok)  # cheapest within tolerance


def test_package_validates_and_flops_add_up(synthetic_package):
    m = load_manifest(synthetic_package)  # schema + sha256 of every file
    assert {c.file for c in m.components().values()} >= {"trunk.onnx", "clustifier.onnx",
                                                        "original.onnx", "head0.onnx"}
    assert all(c.flops > 0 for c in m.components().values())
    assert m.trunk.flops < m.original.flops
    assert len(m.clustifier_confusion) == m.num_clusters
    assert sum(map(sum, m.clustifier_confusion)) == m.training.calib_images


def test_tau_sweep_in_manifest(synthetic_package):
    m = load_manifest(synthetic_package)
    taus = [r.tau for r in m.tau_sweep]
    assert taus == [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
    k = m.num_clusters
    first, last = m.tau_sweep[0], m.tau_sweep[-1]
    assert first.heads_histogram[0] == m.training.val_images  # τ = 0: one head each
    assert last.heads_histogram == [0] * (k - 1) + [m.training.val_images]  # τ = 1: all heads
    assert last.cluster_accuracy == 1.0
    heads = [r.mean_heads for r in m.tau_sweep]
    assert heads == sorted(heads)
    all_heads = m.shared_flops() + sum(c.head.flops for c in m.clusters)
    assert last.mean_flops == pytest.approx(all_heads)
    assert "tau_sweep.png" in m.extra_files
    # The sweep's accuracy matches the runner's on the same images (one implementation).
    assert 0.3 < first.top1 <= 1.0


def test_runner_flops_and_routing(synthetic_run, synthetic_package):
    runner = PackageRunner(synthetic_package)
    images, labels = synthetic_run.part("val")
    m = runner.manifest
    for tau in (0.0, 0.8, 1.0):
        result = runner.run(images[:16], tau)
        for p in result.predictions:
            assert p.flops.total == m.trunk.flops + m.clustifier.flops + sum(
                m.clusters[h].head.flops for h in p.activation.heads)
            assert p.scores.sum() == pytest.approx(1.0)
            assert p.cluster_probs.sum() == pytest.approx(1.0)
            if tau == 0.0:
                assert len(p.activation.heads) == 1
            if tau == 1.0:
                assert len(p.activation.heads) == m.num_clusters
    original = runner.run_original(images[:4])
    assert all(p.flops.total == m.original.flops and p.flops.saving == 0 for p in original.predictions)


def test_rerun_skips_finished_stages(synthetic_run, caplog):
    caplog.set_level("INFO")
    synthetic_run.run()
    assert caplog.text.count("already done") == len(STAGES)


def test_pruned_heads_and_joint_combination_end_to_end(synthetic_run, tmp_path):
    """The Tiny-ImageNet recipe on the synthetic data: clustifier and heads pruned from the
    original's tail, heads distilled with logit matching on their own and other clusters' images
    (negatives), joint combination. It reuses the
    fixture's original, similarity and clusters, and runs the later stages through the sweep."""
    import shutil

    from tests.conftest import ROOT, TEST_OVERRIDES
    from training.config import load_config
    from training.pipeline import Run

    run_dir = tmp_path / "pruned-run"
    run_dir.mkdir()
    for name in ("original.pt", "similarity.npz", "clusters.json"):
        shutil.copy(synthetic_run.dir / name, run_dir / name)
    overrides = [o for o in TEST_OVERRIDES if not o.startswith("head_family")] + [
        f'run_dir="{run_dir}"', f'package.out_dir="{run_dir / "package"}"',
        'clustifier={name="clustifier-pruned", replace=["pruned", "pruned"], mid_ratio=0.5}',
        'head_family=[{name="pruned", replace=["pruned", "pruned"], mid_ratio=0.5}]',
        "head_optim.logit_match=0.1", "head_negatives=0.5", 'package.combination="joint"',
        'package.weighting="probability"', 'package.ranking="probability"',
    ]
    run = Run(load_config(ROOT / "configs" / "synthetic.toml", overrides))
    run.run()
    m = load_manifest(run.package_dir())
    assert m.activator.combination == "joint"
    assert {c.head.architecture for c in m.clusters} == {"pruned"}
    assert m.clustifier.flops < m.original.flops - m.trunk.flops  # pruned: cheaper than the tail
    assert all(c.head.flops < m.original.flops - m.trunk.flops for c in m.clusters)
    last = m.tau_sweep[-1]  # τ = 1: every head, one softmax over all their logits
    assert last.top1 >= m.training.original_accuracy.top1 - 0.1


def test_diagnose_compares_the_heads_with_the_original_as_heads(synthetic_run):
    """training.diagnose: with the original restricted to each cluster as heads, τ = 0 is right
    only where the clustifier is; with one head both combination rules agree."""
    from training.diagnose import diagnose, markdown

    report = diagnose(synthetic_run.dir, synthetic_run.package_dir(), [0.0, 1.0])
    first, last = report["rows"]
    assert first["mean_heads"] == 1.0 and last["mean_heads"] == len(synthetic_run.load_clusters())
    assert first["original_eq3"] == first["original_joint"]  # one head: both rules agree
    assert first["package_eq3"] == first["package_joint"]
    assert first["original_eq3"] <= report["clustifier_accuracy"] + 1e-12
    top = report["clustifier_top_k"]
    assert report["clustifier_accuracy"] <= top[2] <= top[3] <= top[4] <= 1.0
    assert "| 0 | 1.00 |" in markdown(report)
