"""What a finished training run hands to export: the trained modules and the facts about them.

Export takes a ``RunArtifacts`` (``training.pipeline.Run.artifacts``) and never reads a run
directory itself, so the run's file layout is training's business alone and export can be fed
by anything that trained the same modules (a test, another trainer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import RunConfig
from training.models.heads import HeadNet
from training.models.resnet import ResNet, Trunk


@dataclass(frozen=True)
class HeadChoice:
    """A trained candidate head (heads.json): the export times it and may choose it."""

    cluster: int
    arch: str
    accuracy: float  # top-1 inside its cluster on the calibration split
    flops: int


@dataclass(frozen=True)
class SplitSizes:
    train: int
    calib: int
    val: int


@dataclass(frozen=True)
class RunArtifacts:
    """Every trained part of one run, in eval mode, with what the manifest says about them."""

    config: RunConfig
    dataset_name: str
    class_ids: list[str]
    class_names: list[str]
    split_sizes: SplitSizes
    clusters: list[list[int]]  # class indices of each cluster
    original: ResNet
    trunk: Trunk
    clustifier: HeadNet
    head_candidates: list[HeadChoice]
    load_head: Callable[[int, str], HeadNet]  # (cluster, family member) -> trained head
    original_accuracy: dict[str, float]  # {"top1", "top5"} on the validation split (PyTorch)
    clustifier_accuracy: float  # on the validation split
    clustifier_confusion: list[list[int]]  # on the calibration split: the activator's matrix
    cluster_plot: Path | None  # cluster_sizes.png, shipped in the package when present
    images: Callable[[str], tuple[np.ndarray, np.ndarray]]  # "val" | "calib" -> (images, labels)

    @property
    def package_dir(self) -> Path:
        """Where the package goes unless told otherwise: ``[package] out_dir`` or RUN_DIR/package."""
        out = self.config.package.out_dir
        return Path(out) if out else Path(self.config.run_dir) / "package"

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)
