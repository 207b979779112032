"""What limits a CP-CNN package: the clustifier, the heads, or the combination rule.

``python -m export diagnose RUN_DIR [--package DIR]`` evaluates, on the run's validation split:

* the original model's top-1 and its *cluster* accuracy (argmax class mapped to its cluster),
* the clustifier's accuracy and how often the true cluster is among its top 2/3/4,
* top-1 per τ for the package's heads and for *the original as heads* — the original model's own
  logits restricted to each cluster — under both combination rules (``eq3``, ``joint``).

The original-as-heads rows show what the clustifier and the combination rule make of heads that
are exactly as good as the original inside each cluster: if the package's heads fall short of
them, the heads are what limits; if even those rows stay below the original, the clustifier or
the rule is. (Heads trained for their cluster can beat them: they need not spread probability over
the other clusters' classes.) The activator and ``combine`` are the serving ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from export.sweep import shared_outputs
from modelpack.activator import Activation, combine, softmax
from modelpack.manifest import load_manifest
from modelpack.runner import PackageRunner
from training.artifacts import RunArtifacts
from training.engine import predict
from training.pipeline import Run

logger = logging.getLogger(__name__)


def top1(activations: list[Activation], head_logits: list[np.ndarray], clusters: list[list[int]],
         labels: np.ndarray, combination: str, num_classes: int) -> float:
    """Top-1 of the activator's choices; ``head_logits[k]`` is (N, |cluster k|) for every image."""
    right = 0
    for i, act in enumerate(activations):
        scores = combine(act, {h: head_logits[h][i] for h in act.heads}, clusters, num_classes,
                         combination)
        right += int(np.argmax(scores) == labels[i])
    return right / len(labels)


def diagnose(art: RunArtifacts, package_dir: Path, taus: list[float]) -> dict:
    """The report of the module docstring for the package ``art`` was exported to."""
    m = load_manifest(package_dir)
    images, labels = art.images("val")
    clusters = m.cluster_members
    num_classes = len(m.class_names)
    to_cluster = np.zeros(num_classes, dtype=np.int64)
    for k, members in enumerate(clusters):
        to_cluster[members] = k
    original = predict(art.original, images, desc="original", mean=art.config.mean,
                       std=art.config.std)  # (N, C)
    runner = PackageRunner(package_dir, verify=False)
    shared = shared_outputs(runner, images)  # per batch: trunk features, clustifier logits
    probs = softmax(np.concatenate([s.cluster_logits for s in shared]), axis=1)  # (N, K)
    package_heads = [np.concatenate([runner.head_logits(k, s.features) for s in shared])
                     for k in range(len(clusters))]
    original_heads = [original[:, members] for members in clusters]
    truth = to_cluster[labels]
    ranked = np.argsort(-probs, axis=1)
    a, activator = m.activator, runner.activator  # the serving activator, as the package sets it
    rows = []
    for tau in taus:
        activations = activator.select_batch(probs, tau)  # once per τ, shared by all four rows
        row: dict = {"tau": tau,
                     "mean_heads": float(np.mean([len(a.heads) for a in activations]))}
        for name, head_logits in (("package", package_heads), ("original", original_heads)):
            for combination in ("eq3", "joint"):
                row[f"{name}_{combination}"] = top1(activations, head_logits, clusters, labels,
                                                    combination, num_classes)
        rows.append(row)
        logger.info("τ=%.2f %s", tau, {k: round(v, 4) for k, v in row.items()})
    return {
        "original_top1": float(np.mean(original.argmax(1) == labels)),
        "original_cluster_accuracy": float(np.mean(to_cluster[original.argmax(1)] == truth)),
        "clustifier_accuracy": float(np.mean(ranked[:, 0] == truth)),
        "clustifier_top_k": {k: float(np.mean(np.any(ranked[:, :k] == truth[:, None], axis=1)))
                             for k in (2, 3, 4)},
        "activator": {"ranking": a.ranking, "weighting": a.weighting},
        "rows": rows,
    }


def markdown(report: dict) -> str:
    top_k = ", ".join(f"top-{k} {100 * v:.1f}%" for k, v in report["clustifier_top_k"].items())
    lines = [
        f"Original top-1 {100 * report['original_top1']:.2f}%, its cluster accuracy "
        f"{100 * report['original_cluster_accuracy']:.2f}%; clustifier accuracy "
        f"{100 * report['clustifier_accuracy']:.2f}% ({top_k}). Activator ranking "
        f"`{report['activator']['ranking']}`, weighting `{report['activator']['weighting']}`.",
        "",
        "| τ | mean heads | package heads, eq3 | package heads, joint | original as heads, eq3 | original as heads, joint |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['tau']:g} | {r['mean_heads']:.2f} | {100 * r['package_eq3']:.2f}% | "
                     f"{100 * r['package_joint']:.2f}% | {100 * r['original_eq3']:.2f}% | "
                     f"{100 * r['original_joint']:.2f}% |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--package", type=Path, help="package dir (default: the run's out_dir)")
    parser.add_argument("--taus", default="0,0.5,0.6,0.7,0.8,0.9,1")
    parser.add_argument("--json", type=Path, help="also write the report here")


def run(args: argparse.Namespace) -> int:
    art = Run.open(args.run_dir).artifacts()
    report = diagnose(art, args.package or art.package_dir,
                      [float(t) for t in args.taus.split(",")])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(report))
    return 0
