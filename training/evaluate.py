"""Offline evaluation: the τ sweep over an exported package (stage 9).

It runs the package through ``service.runner.PackageRunner`` — the very runner and activator the
server uses — so the table predicts what serving will do, FLOPs included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from service.manifest import Accuracy, SweepRow, load_manifest, sha256_file, write_manifest
from service.runner import BatchResult, PackageRunner
from training.engine import topk_accuracy
from training.report import plot_tau_sweep

logger = logging.getLogger(__name__)

SWEEP_PLOT = "tau_sweep.png"


def _batched(run, images: np.ndarray, batch_size: int, desc: str) -> list[BatchResult]:
    return [run(images[i:i + batch_size])
            for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False)]


def evaluate_tau(runner: PackageRunner, images: np.ndarray, labels: np.ndarray, tau: float,
                 original_top1: float, batch_size: int = 256) -> SweepRow:
    """One row of the sweep: accuracy, FLOPs and the heads-run histogram at threshold ``tau``."""
    m = runner.manifest
    results = _batched(lambda b: runner.run(b, tau), images, batch_size, f"τ={tau:g}")
    preds = [p for r in results for p in r.predictions]
    scores = np.stack([p.scores for p in preds])  # (N, C)
    n_heads = np.array([len(p.activation.heads) for p in preds])
    flops = np.array([p.flops.total for p in preds], dtype=np.float64)
    members = [set(c) for c in m.cluster_members]
    cluster_hit = np.mean([any(int(y) in members[h] for h in p.activation.heads)
                           for p, y in zip(preds, labels, strict=True)])
    top1 = topk_accuracy(scores, labels, 1)
    mean_flops = float(flops.mean())
    return SweepRow(
        tau=tau, top1=top1, top5=topk_accuracy(scores, labels, 5), mean_flops=mean_flops,
        flop_saving=1.0 - mean_flops / m.original.flops, mean_heads=float(n_heads.mean()),
        heads_histogram=np.bincount(n_heads, minlength=m.num_clusters + 1)[1:].tolist(),
        cluster_accuracy=float(cluster_hit), top1_gain=top1 - original_top1,
    )


def sweep_package(package_dir: str | Path, images: np.ndarray, labels: np.ndarray,
                  taus: Sequence[float], batch_size: int = 256) -> list[SweepRow]:
    """Sweep τ over (N, H, W, 3) uint8 validation images; store the table and plot in the package."""
    package_dir = Path(package_dir)
    runner = PackageRunner(package_dir)
    m = runner.manifest
    orig = _batched(runner.run_original, images, batch_size, "original")
    orig_scores = np.stack([p.scores for r in orig for p in r.predictions])
    original = Accuracy(top1=topk_accuracy(orig_scores, labels, 1),
                        top5=topk_accuracy(orig_scores, labels, 5))
    rows = [evaluate_tau(runner, images, labels, t, original.top1, batch_size) for t in taus]
    for r in rows:
        logger.info("τ=%.2f top-1 %.4f top-5 %.4f  %.2f MFLOPs  saving %5.1f%%  heads %s",
                    r.tau, r.top1, r.top5, r.mean_flops / 1e6, 100 * r.flop_saving,
                    r.heads_histogram)
    logger.info("original (ONNX): top-1 %.4f top-5 %.4f  %.2f MFLOPs", original.top1,
                original.top5, m.original.flops / 1e6)
    plot_tau_sweep(rows, original.top1, m.original.flops, package_dir / SWEEP_PLOT,
                   title=f"{m.name} {m.version}: τ sweep on {len(labels)} validation images")
    training = m.training.model_copy(update={"original_accuracy": original})
    extra = dict(m.extra_files, **{SWEEP_PLOT: sha256_file(package_dir / SWEEP_PLOT)})
    write_manifest(m.model_copy(update={"tau_sweep": rows, "training": training,
                                        "extra_files": extra}), package_dir)
    load_manifest(package_dir)  # the updated package still validates
    return rows
