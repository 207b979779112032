"""End to end on the synthetic dataset: train → Algorithm 2 → heads → export → τ sweep."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from modelpack.manifest import load_manifest
from modelpack.runner import PackageRunner
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


def test_every_stage_left_its_artifact(synthetic_run, synthetic_package):
    assert all(synthetic_run.done(s) for s in STAGES)
    m = load_manifest(synthetic_package)
    # This clustifier is not built on the original's classifier: no class logits, no fill.
    assert m.clustifier.class_output == "" and m.activator.fill == "none"
    heads = json.loads((synthetic_run.dir / "heads.json").read_text())
    k = len(synthetic_run.load_clusters())
    assert len(heads["candidates"]) == 2 * k  # every family member trained for every cluster


def test_heads_chosen_by_measured_time(synthetic_run, synthetic_package):
    """Export times every candidate on ONNX Runtime and keeps, per cluster, the one with the least
    relative time among those within head_tolerance of the best; the package holds only those."""
    m = load_manifest(synthetic_package)
    sel = m.head_selection
    assert sel is not None and sel.cost == "time" and sel.timing.batch_sizes == [1, 32]
    assert all(set(c.latency_ms) == {1, 32} and min(c.latency_ms.values()) > 0
               for c in m.components().values())
    assert len(sel.candidates) == 2 * m.num_clusters
    for cluster in m.clusters:
        same = [c for c in sel.candidates if c.cluster == cluster.index]
        (chosen,) = [c for c in same if c.chosen]
        best = max(c.accuracy for c in same)
        ok = [c for c in same if c.accuracy >= best - sel.tolerance]
        assert chosen.cost == min(c.cost for c in ok)
        assert chosen.cost == pytest.approx(sum(chosen.latency_ms[b] / m.original.latency_ms[b]
                                                for b in (1, 32)))
        assert cluster.head.architecture == chosen.arch
        assert cluster.head.latency_ms == chosen.latency_ms
    # The trunk was also timed at the other cuts (the card's split-point comparison).
    assert [p.split_after for p in m.split_points] == ["layer1", "layer2", "layer3"]
    (shipped,) = [p for p in m.split_points if p.chosen]
    assert shipped.split_after == synthetic_run.cfg.split_after
    assert shipped.trunk_flops == m.trunk.flops
    flops = [p.trunk_flops for p in m.split_points]
    assert flops == sorted(flops) and flops[-1] < m.original.flops
    assert not (synthetic_package / "candidates").exists()
    assert sorted(p.name for p in synthetic_package.glob("*.onnx")) == sorted(
        c.file for c in m.components().values())


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
    original's tail (one member also cut in depth), heads distilled with logit matching on their
    own and other clusters' images (negatives) in bf16 from an unmirrored feature cache, joint
    combination, float16 weight storage. It reuses the
    fixture's original, similarity and clusters, and runs the later stages through the sweep."""
    import shutil

    from export.build import build_package
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
        'head_family=[{name="pruned", replace=["pruned", "pruned"], mid_ratio=0.5}, '
        '{name="short", replace=["pruned", "pruned"], mid_ratio=0.25, blocks=1}]',
        "head_optim.logit_match=0.1", "head_negatives=0.5", 'package.combination="joint"',
        'package.weighting="probability"', 'package.ranking="probability"',
        "feature_mirror=false", 'head_optim.precision="bf16"', 'head_cost="flops"',
        'package.weights="fp16"',
    ]
    run = Run(load_config(ROOT / "configs" / "synthetic.toml", overrides))
    run.run()
    package = run.artifacts().package_dir
    build_package(run.artifacts())
    m = load_manifest(package)
    assert m.activator.combination == "joint"
    # A pooling clustifier exports its class logits; the sweep chose the top-5 fill on calib.
    assert m.clustifier.class_output == "class_logits"
    assert m.activator.fill in ("none", "clustifier") and "calibration" in m.activator.fill_reason
    filled = PackageRunner(package, manifest=m.model_copy(update={
        "activator": m.activator.model_copy(update={"fill": "clustifier"})}))
    images, _ = run.part("val")
    for p in filled.run(images[:8], 0.0).predictions:
        run_classes = m.clusters[p.activation.heads[0]].classes
        others = np.setdiff1d(np.arange(len(m.class_names)), run_classes)
        np.testing.assert_allclose(p.scores[others], p.class_probs[others])
        assert p.scores.sum() == pytest.approx(1.0)
    import onnx  # package.weights = "fp16": every component's large weights stored as float16
    for comp in m.components().values():
        graph = onnx.load(str(package / comp.file)).graph
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    features, _, labels = run.train_features()
    assert len(features) == len(labels) == len(run.splits.train)  # no mirrored copies
    # FLOPs as the cost: the depth-cut head wins wherever it is within the tolerance.
    sel = m.head_selection
    assert sel.cost == "flops"
    for c in m.clusters:
        same = {h.arch: h for h in sel.candidates if h.cluster == c.index}
        assert same["short"].flops < same["pruned"].flops
        within = same["short"].accuracy >= same["pruned"].accuracy - sel.tolerance
        assert c.head.architecture == ("short" if within else "pruned")
    assert m.clustifier.flops < m.original.flops - m.trunk.flops  # pruned: cheaper than the tail
    assert all(c.head.flops < m.original.flops - m.trunk.flops for c in m.clusters)
    last = m.tau_sweep[-1]  # τ = 1: every head, one softmax over all their logits
    assert last.top1 >= m.training.original_accuracy.top1 - 0.1


def test_diagnose_compares_the_heads_with_the_original_as_heads(synthetic_run, synthetic_package):
    """export.diagnose: with the original restricted to each cluster as heads, τ = 0 is right
    only where the clustifier is; with one head both combination rules agree."""
    from export.diagnose import diagnose, markdown

    report = diagnose(synthetic_run.artifacts(), synthetic_package, [0.0, 1.0])
    first, last = report["rows"]
    assert first["mean_heads"] == 1.0 and last["mean_heads"] == len(synthetic_run.load_clusters())
    assert first["original_eq3"] == first["original_joint"]  # one head: both rules agree
    assert first["package_eq3"] == first["package_joint"]
    assert first["original_eq3"] <= report["clustifier_accuracy"] + 1e-12
    top = report["clustifier_top_k"]
    assert report["clustifier_accuracy"] <= top[2] <= top[3] <= top[4] <= 1.0
    assert "| 0 | 1.00 |" in markdown(report)


def test_export_refuses_a_run_that_has_not_finished_training(synthetic_run, tmp_path):
    """Export takes a finished run only, and says which stages are missing and what to run."""
    import shutil

    from training.pipeline import Run

    run_dir = tmp_path / "half-run"
    run_dir.mkdir()
    for name in ("original.pt", "similarity.npz", "clusters.json"):
        shutil.copy(synthetic_run.dir / name, run_dir / name)
    config = json.loads((synthetic_run.dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "run_dir": str(run_dir)}))
    run = Run.open(run_dir)
    with pytest.raises(FileNotFoundError, match=r"\(stages trunk, clustifier, heads, confusion "
                       r"not done\): run `python -m training run"):
        run.artifacts()


def test_the_export_cli_packages_a_run_and_rewrites_its_card(synthetic_run, synthetic_package,
                                                             tmp_path):
    """`python -m export package RUN_DIR --out D --no-sweep` then `card D --notes N`: the card is
    rendered from the manifest, the notes appended, and the checksums still validate."""
    from export.__main__ import main

    out = tmp_path / "pkg"
    assert main(["package", str(synthetic_run.dir), "--out", str(out), "--no-sweep",
                 "--version", "9.9.9"]) == 0
    m = load_manifest(out)  # schema, files, checksums
    assert m.version == "9.9.9" and m.tau_sweep == [] and not (out / "tau_sweep.png").exists()
    assert not out.with_name("pkg.partial").exists()
    notes = tmp_path / "notes.md"
    notes.write_text("Measured: nothing yet.\n")
    assert main(["card", str(out), "--notes", str(notes)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("# synthetic 9.9.9") and card.endswith("Measured: nothing yet.\n")
    load_manifest(out)  # the card's new checksum is in the manifest
    assert main(["package", str(tmp_path / "no-such-run")]) == 2


def test_original_can_start_from_a_runs_original_pt(synthetic_run, tmp_path):
    """original_init = a run's original.pt: widened (or taken as is) without changing its function."""
    from training.config import config_from_dict
    from training.pipeline import Run

    base = json.loads((synthetic_run.dir / "config.json").read_text())
    source = torch.load(synthetic_run.dir / "original.pt", weights_only=False)["val_accuracy"]
    for width in (base["model"]["width"], 2 * base["model"]["width"]):
        cfg = config_from_dict({**base, "run_dir": str(tmp_path / f"w{width}"),
                                "original_init": str(synthetic_run.dir / "original.pt"),
                                "model": {**base["model"], "width": width},
                                "original": {**base["original"], "epochs": 0}})
        run = Run(cfg)
        run.run(stages=("original",))
        started = torch.load(run.dir / "original.pt", weights_only=False)
        assert started["model_cfg"]["width"] == width
        assert started["val_accuracy"] == pytest.approx(source, abs=1e-6)
    other = config_from_dict({**base, "run_dir": str(tmp_path / "deeper"),
                              "original_init": str(synthetic_run.dir / "original.pt"),
                              "model": {**base["model"], "layers": [2, 2, 2, 2]}})
    with pytest.raises(ValueError, match="layout"):
        Run(other).run(stages=("original",))
