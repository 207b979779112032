"""``python -m export evaluate PACKAGE``: the τ sweep of a package with other activator options
or on another backend, printed in the card's columns; the package is not changed.

The validation split is rebuilt from the config in the manifest (same data, same seeded split),
so anyone with the data can check a card's figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from export.card import sweep_table
from export.sweep import _batched, evaluate_tau, shared_outputs
from modelpack.backend import RunnerOptions
from modelpack.manifest import Manifest, load_manifest
from modelpack.runner import PackageRunner
from training.config import config_from_dict
from training.data import load_dataset, split_dataset
from training.engine import topk_accuracy


def validation_split(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """The package's own validation images and labels, rebuilt from its manifest's config."""
    cfg = config_from_dict(manifest.training.config)
    data = load_dataset(cfg.data)
    val = split_dataset(data.labels, cfg.val_per_class, cfg.calib_per_class, cfg.seed).val
    return data.images[val], data.labels[val]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package_dir", type=Path)
    parser.add_argument("--ranking", choices=("confusion", "probability"))
    parser.add_argument("--weighting", choices=("confusion", "probability"))
    parser.add_argument("--combination", choices=("eq3", "joint"))
    parser.add_argument("--taus", default="0,0.5,0.7,0.8,0.9,0.95,1")
    parser.add_argument("--backend", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="what runs the graphs (the server's CPCNN_BACKEND)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="OpenVINO's compute precision (the server's CPCNN_PRECISION)")


def run(args: argparse.Namespace) -> int:
    m = load_manifest(args.package_dir)
    options = {k: v for k, v in (("ranking", args.ranking), ("weighting", args.weighting),
                                 ("combination", args.combination)) if v}
    manifest = m.model_copy(update={"activator": m.activator.model_copy(update=options)})
    runner = PackageRunner(args.package_dir, RunnerOptions(backend=args.backend,
                                                           precision=args.precision),
                           manifest=manifest)
    images, labels = validation_split(m)
    orig = _batched(runner.run_original, images, 256, "original")
    orig_scores = np.stack([p.scores for r in orig for p in r.predictions])
    original_top1 = topk_accuracy(orig_scores, labels, 1)
    shared = shared_outputs(runner, images)
    rows = [evaluate_tau(runner, images, labels, float(t), original_top1, shared=shared)
            for t in args.taus.split(",")]
    a = manifest.activator
    sys.stdout.write(
        f"{runner.backend.describe()}; ranking {a.ranking}, weighting {a.weighting}, "
        f"combination {a.combination}; original top-1 {100 * original_top1:.2f}%, "
        f"top-5 {100 * topk_accuracy(orig_scores, labels, 5):.2f}%\n\n"
        + "\n".join(sweep_table(rows, m.num_clusters, m.activator.default_tau)) + "\n")
    return 0
