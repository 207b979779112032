"""The τ sweep over an exported package: the table, plot and default τ of its manifest.

It runs the package through ``modelpack.runner.PackageRunner`` — the very runner and activator the
server uses — so the table predicts what serving will do, FLOPs included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from export.plots import plot_tau_sweep
from modelpack.activator import fill_unrun, softmax
from modelpack.backend import RunnerOptions
from modelpack.manifest import (
    Accuracy,
    Manifest,
    PrecisionRow,
    PrecisionSweep,
    SweepRow,
    sha256_file,
)
from modelpack.runner import BatchResult, PackageRunner, Prediction, Shared, normalize
from training.engine import topk_accuracy

logger = logging.getLogger(__name__)

SWEEP_PLOT = "tau_sweep.png"


def _batched(run, images: np.ndarray, batch_size: int, desc: str) -> list[BatchResult]:
    return [run(images[i:i + batch_size])
            for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False)]


SharedOutputs = list[Shared]  # per batch: trunk features, clustifier outputs


def shared_outputs(runner: PackageRunner, images: np.ndarray,
                   batch_size: int = 256) -> SharedOutputs:
    """Trunk + clustifier over the images once: they do not depend on τ, so a sweep reuses them
    and runs only the activator, heads and Eq. 3 per τ (``PackageRunner.route``)."""
    spec = runner.manifest.input
    return [runner.shared(normalize(images[i:i + batch_size], spec))
            for i in tqdm(range(0, len(images), batch_size), desc="trunk + clustifier",
                          leave=False)]


def evaluate_tau(runner: PackageRunner, images: np.ndarray, labels: np.ndarray, tau: float,
                 original_top1: float, batch_size: int = 256,
                 shared: SharedOutputs | None = None) -> SweepRow:
    """One row of the sweep: accuracy, FLOPs and the heads-run histogram at threshold ``tau``."""
    m = runner.manifest
    shared = shared if shared is not None else shared_outputs(runner, images, batch_size)
    results = [runner.route(batch, tau) for batch in shared]
    preds = [p for r in results for p in r.predictions]
    scores = np.stack([p.scores for p in preds])  # (N, C)
    return _row(m, preds, scores, labels, tau, original_top1)


def _row(m: Manifest, preds: list[Prediction], scores: np.ndarray, labels: np.ndarray, tau: float,
         original_top1: float) -> SweepRow:
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


TOP1_TIE = 0.001  # top-1 differences below 0.1 point (10 of 10,000 images) count as ties


def choose_default_tau(rows: Sequence[SweepRow], original_top1: float,
                       max_top1_loss: float) -> tuple[float, str]:
    """The τ to serve by default, and why: the largest FLOP saving whose top-1 is at most
    ``max_top1_loss`` below the original model's; when no τ is that close, the most accurate τ
    that still spends fewer FLOPs than the original (a default costlier than the model it
    replaces would defeat the point), or the cheapest τ if none does."""
    if not rows:
        raise ValueError("no sweep rows to choose a default τ from")
    floor = original_top1 - max_top1_loss
    ok = [r for r in rows if r.top1 >= floor - 1e-12]
    loss = f"{100 * max_top1_loss:g} point{'s' if max_top1_loss != 0.01 else ''}"
    if ok:
        best = max(ok, key=lambda r: (round(r.flop_saving, 9), -r.tau))
        return best.tau, (
            f"τ = {best.tau:g}: of the swept τ values whose top-1 stays within {loss} of the "
            f"original model's ({100 * original_top1:.2f}%), it saves the most FLOPs: top-1 "
            f"{100 * best.top1:.2f}% ({100 * best.top1_gain:+.2f} points), FLOP saving "
            f"{100 * best.flop_saving:.1f}%, {best.mean_heads:.2f} heads per image on average. "
            "Lower τ values save more but lose more accuracy; higher ones cost more for little or "
            "no gain (see the sweep table).")
    saving = [r for r in rows if r.flop_saving > 0]
    if saving:
        # Within TOP1_TIE of the most accurate, top-1 differences are a handful of images:
        # take the cheapest of those rather than pay FLOPs for noise.
        top = max(r.top1 for r in saving)
        best = max((r for r in saving if r.top1 >= top - TOP1_TIE),
                   key=lambda r: (round(r.flop_saving, 9), -r.tau))
        why = (f"the one that saves the most FLOPs among those within {100 * TOP1_TIE:g} point "
               "of the most accurate τ that still spends fewer FLOPs than the original")
    else:
        best = max(rows, key=lambda r: (round(r.flop_saving, 9), -r.tau))
        why = "none saves FLOPs either, so this is the cheapest"
    return best.tau, (
        f"τ = {best.tau:g}: no swept τ keeps top-1 within {loss} of the original model's "
        f"({100 * original_top1:.2f}%); {why}: top-1 {100 * best.top1:.2f}% "
        f"({100 * best.top1_gain:+.2f} points) at a FLOP saving of {100 * best.flop_saving:.1f}%, "
        f"{best.mean_heads:.2f} heads per image on average.")


def choose_fill(runner: PackageRunner, images: np.ndarray, labels: np.ndarray,
                taus: Sequence[float], batch_size: int = 256) -> tuple[str, str]:
    """``fill`` for the package, and why: "clustifier" when, averaged over ``taus`` on these
    (calibration) images, it raises top-5 and keeps top-1 within ``TOP1_TIE``; else "none".

    The heads run once per τ; both scorings come from the same predictions (``fill_unrun`` only
    rescales what ``combine`` gave), so the comparison is exact, not two noisy runs.
    """
    none_manifest = runner.manifest.model_copy(
        update={"activator": runner.manifest.activator.model_copy(update={"fill": "none"})})
    if not runner.manifest.clustifier.class_output:
        return "none", "fill = none: the clustifier has no class logits to fill from."
    plain = PackageRunner(runner.package_dir, manifest=none_manifest, verify=False)
    shared = shared_outputs(plain, images, batch_size)
    clusters = runner.manifest.cluster_members
    acc = {"none": np.zeros(2), "clustifier": np.zeros(2)}
    class_probs = softmax(np.concatenate([batch.class_logits for batch in shared]), axis=1)
    for tau in tqdm(taus, desc="top-5 fill on calib", leave=False):
        preds = [p for batch in shared for p in plain.route(batch, tau).predictions]
        base = np.stack([p.scores for p in preds])
        filled = np.stack([fill_unrun(p.scores, p.activation, clusters, q)
                           for p, q in zip(preds, class_probs, strict=True)])
        for name, scores in (("none", base), ("clustifier", filled)):
            acc[name] += [topk_accuracy(scores, labels, 1), topk_accuracy(scores, labels, 5)]
    (n1, n5), (f1, f5) = acc["none"] / len(taus), acc["clustifier"] / len(taus)
    better = f5 > n5 and f1 >= n1 - TOP1_TIE
    reason = (f"fill = {'clustifier' if better else 'none'}: on the {len(labels)} calibration "
              f"images, averaged over τ in {list(taus)}, filling the classes of heads not run from "
              f"the clustifier's class softmax gives top-5 {100 * f5:.2f}% against "
              f"{100 * n5:.2f}% and top-1 {100 * f1:.2f}% against {100 * n1:.2f}% without.")
    logger.info("%s", reason)
    return ("clustifier" if better else "none"), reason


def precision_sweep(package_dir: Path, manifest: Manifest, images: np.ndarray,
                    labels: np.ndarray, taus: Sequence[float],
                    batch_size: int = 256) -> PrecisionSweep | None:
    """Top-1/top-5 of the original and at every τ on OpenVINO bf16, where this machine has
    both (the card shows them beside fp32); None where it has not."""
    from modelpack.backend_choice import openvino_available

    if not openvino_available():
        return None
    from modelpack.openvino_backend import cpu_has_bf16

    if not cpu_has_bf16():
        return None
    runner = PackageRunner(package_dir, RunnerOptions(backend="openvino", precision="bf16"),
                           manifest=manifest, verify=False)
    orig = _batched(runner.run_original, images, batch_size, "original bf16")
    scores = np.stack([p.scores for r in orig for p in r.predictions])
    shared = shared_outputs(runner, images, batch_size)
    rows = []
    for tau in taus:
        row = evaluate_tau(runner, images, labels, tau, 0.0, batch_size, shared)
        rows.append(PrecisionRow(tau=tau, top1=row.top1, top5=row.top5))
    return PrecisionSweep(backend="openvino", precision="bf16",
                          original=Accuracy(top1=topk_accuracy(scores, labels, 1),
                                            top5=topk_accuracy(scores, labels, 5)), rows=rows)


def sweep_package(package_dir: str | Path, manifest: Manifest, images: np.ndarray,
                  labels: np.ndarray, taus: Sequence[float], batch_size: int = 256, *,
                  max_top1_loss: float | None = None,
                  calib: tuple[np.ndarray, np.ndarray] | None = None) -> Manifest:
    """Sweep τ over (N, H, W, 3) uint8 validation images; the manifest with the table.

    ``manifest`` describes the graphs in ``package_dir`` (it need not be written yet); the plot is
    written beside them, the manifest is returned for the one writer (``export.build``). With
    ``max_top1_loss`` the default τ is chosen from the sweep (``choose_default_tau``), with the
    reason. With ``calib`` images and labels the top-5 fill is chosen on them first
    (``choose_fill``) and the sweep runs with it.
    """
    package_dir = Path(package_dir)
    m = manifest
    runner = PackageRunner(package_dir, manifest=m, verify=False)
    if calib is not None:
        fill, fill_reason = choose_fill(runner, *calib, taus, batch_size)
        m = m.model_copy(update={"activator": m.activator.model_copy(
            update={"fill": fill, "fill_reason": fill_reason})})
        runner = PackageRunner(package_dir, manifest=m, verify=False)
    orig = _batched(runner.run_original, images, batch_size, "original")
    orig_scores = np.stack([p.scores for r in orig for p in r.predictions])
    original = Accuracy(top1=topk_accuracy(orig_scores, labels, 1),
                        top5=topk_accuracy(orig_scores, labels, 5))
    shared = shared_outputs(runner, images, batch_size)
    rows = [evaluate_tau(runner, images, labels, t, original.top1, batch_size, shared)
            for t in tqdm(taus, desc="τ sweep", leave=False)]
    for r in rows:
        logger.info("τ=%.2f top-1 %.4f top-5 %.4f  %.2f MFLOPs  saving %5.1f%%  heads %s",
                    r.tau, r.top1, r.top5, r.mean_flops / 1e6, 100 * r.flop_saving,
                    r.heads_histogram)
    logger.info("original (ONNX): top-1 %.4f top-5 %.4f  %.2f MFLOPs", original.top1,
                original.top5, m.original.flops / 1e6)
    plot_tau_sweep(rows, original.top1, m.original.flops, package_dir / SWEEP_PLOT,
                   title=f"{m.name} {m.version}: τ sweep on {len(labels)} validation images")
    bf16 = precision_sweep(package_dir, m, images, labels, taus, batch_size)
    if bf16 is not None:
        at = {r.tau: r for r in bf16.rows}
        logger.info("OpenVINO bf16: original top-1 %.4f; %s", bf16.original.top1,
                    ", ".join(f"τ={r.tau:.2f} {at[r.tau].top1:.4f} (fp32 {r.top1:.4f})"
                              for r in rows))
    training = m.training.model_copy(update={"original_accuracy": original})
    extra = dict(m.extra_files, **{SWEEP_PLOT: sha256_file(package_dir / SWEEP_PLOT)})
    activator = m.activator
    if max_top1_loss is not None:
        tau, reason = choose_default_tau(rows, original.top1, max_top1_loss)
        activator = activator.model_copy(update={"default_tau": tau, "default_tau_reason": reason})
        logger.info("default %s", reason)
    return m.model_copy(update={
        "tau_sweep": rows, "training": training, "extra_files": extra, "activator": activator,
        "precision_sweeps": [bf16] if bf16 is not None else []})
