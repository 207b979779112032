"""Execution of a model package: trunk → clustifier → activator → heads → Eq. 3.

The runner holds the CP-CNN logic; a backend (``modelpack.backend``: ONNX Runtime or OpenVINO)
runs the graphs. It works on a batch of already-decoded images and runs each head once per batch
on just the images routed to it, so the same code serves one request, a micro-batch of many, and
the offline τ sweep.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpack.activator import Activation, Activator, combine, fill_unrun, softmax
from modelpack.backend import Backend, RunnerOptions
from modelpack.backend_choice import open_backend
from modelpack.manifest import InputSpec, Manifest, load_manifest

logger = logging.getLogger(__name__)

STAGES = ("trunk", "clustifier", "activator", "heads", "combine")  # conditional mode
ORIGINAL_STAGE = "original"  # original mode: one stage


@dataclass(frozen=True)
class Flops:
    """FLOPs spent on one image, and what the original model would have spent.

    In conditional mode total = trunk + clustifier + heads; in original mode the parts are 0 and
    total = original.
    """

    trunk: int
    clustifier: int
    heads: int
    original: int
    total: int

    @property
    def saving(self) -> float:
        """1 - total / original: the fraction of the original model's FLOPs avoided."""
        return 1.0 - self.total / self.original if self.original else 0.0


@dataclass
class Prediction:
    """Result for one image. ``activation``/``cluster_probs`` are None in original mode."""

    scores: np.ndarray  # (C,) final class scores, sum to 1
    flops: Flops
    activation: Activation | None = None
    cluster_probs: np.ndarray | None = None  # (K,)
    class_probs: np.ndarray | None = None  # (C,) the clustifier's own, when the top-5 fill is on


@dataclass(frozen=True)
class Shared:
    """What every image of a batch pays whatever τ is: trunk features and clustifier outputs."""

    features: Any  # (N, C', H', W'): a host array, or the backend's device tensor (Backend.shared)
    cluster_logits: np.ndarray  # (N, K)
    class_logits: np.ndarray | None = None  # (N, C) when the clustifier exports them


@dataclass
class BatchResult:
    predictions: list[Prediction]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, whole batch


def normalize(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB → (N, 3, H, W) float32, (pixel/255 − mean)/std, as in training."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    if images.shape[1:3] != (spec.size, spec.size):
        raise ValueError(f"expected {spec.size}x{spec.size} images, got {images.shape[1:3]}")
    # Transpose the uint8 pixels first (a quarter of the bytes), then one multiply-add per
    # channel on contiguous memory: 0.28 ms for 32 images on 2 cores, against 3.8 ms for the
    # same arithmetic done on the float array and transposed afterwards (bench/README.md).
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32)
    x *= np.float32(1 / 255) / std
    x -= mean / std
    return x


class PackageRunner:
    """Loads a package once on a backend and runs batches through it."""

    def __init__(self, package_dir: str | Path, options: RunnerOptions | None = None, *,
                 verify: bool = True, manifest: Manifest | None = None) -> None:
        self.package_dir = Path(package_dir)
        self.manifest = manifest or load_manifest(self.package_dir, verify=verify)
        self.options = options or RunnerOptions()
        m = self.manifest
        self.backend: Backend = open_backend(self.package_dir, m, self.options)
        # Several heads of a batch run at once on a pool (where the backend allows it) only when
        # they have at least ``heads_at_once_mflops`` of work (images x head FLOPs, summed): below,
        # the hop to the pool's threads and back costs more than the overlap wins (bench/README.md).
        self._head_pool: ThreadPoolExecutor | None = None
        self.heads_at_once_flops = self.options.heads_at_once_mflops * 1e6
        if self.backend.parallel_heads > 1:
            self._head_pool = ThreadPoolExecutor(self.backend.parallel_heads,
                                                 thread_name_prefix="cpcnn-heads")
            weakref.finalize(self, self._head_pool.shutdown, wait=False)
        self.activator = Activator(
            np.asarray(m.clustifier_confusion),
            ranking=m.activator.ranking,
            weighting=m.activator.weighting,
            smoothing=m.activator.smoothing,
        )
        self.combination = m.activator.combination
        self.fill = m.activator.fill
        self.clusters = m.cluster_members
        self.num_classes = len(m.class_names)
        self.head_flops = [c.head.flops for c in m.clusters]
        logger.info("loaded package %s %s from %s (%d heads) on %s", m.name, m.version,
                    self.package_dir, m.num_clusters, self.backend.describe())

    # -- conditional path -------------------------------------------------------------------
    def run(self, images: np.ndarray, tau: float | Sequence[float] | None = None) -> BatchResult:
        """CP-CNN inference on (N, H, W, 3) uint8 images at threshold ``tau`` (default: manifest's).

        ``tau`` may be one value for the batch or one per image (a micro-batch mixes requests).
        """
        tau = self.manifest.activator.default_tau if tau is None else tau
        return self.run_normalized(normalize(images, self.manifest.input), tau)

    def run_normalized(self, x: np.ndarray, tau: float | Sequence[float]) -> BatchResult:
        """CP-CNN inference on an already normalised (N, 3, H, W) float32 batch."""
        shared, timings = self._shared(x)
        result = self.route(shared, tau)
        result.timings = {**timings, **result.timings}
        return result

    def shared(self, x: np.ndarray) -> Shared:
        """Trunk features and clustifier outputs of a normalised batch: the part of the work
        every image pays whatever τ is. With IOBinding the features stay on the device."""
        return self._shared(x)[0]

    def _shared(self, x: np.ndarray) -> tuple[Shared, dict[str, float]]:
        features, outputs, timings = self.backend.shared(x)
        return Shared(features, outputs[0], outputs[1] if len(outputs) > 1 else None), timings

    def route(self, shared: Shared, tau: float | Sequence[float]) -> BatchResult:
        """Activator → the chosen heads → Eq. 3 (→ the top-5 fill), on ``shared()``'s outputs.

        ``tau`` may be one value for the batch or one per image (a micro-batch mixes requests).
        The offline τ sweep calls this once per τ on features it computed once.
        """
        cluster_logits = shared.cluster_logits
        taus = np.broadcast_to(np.asarray(tau, dtype=np.float64), (len(cluster_logits),))
        t2 = time.perf_counter()
        cluster_probs = softmax(cluster_logits, axis=1)  # (N, K)
        # Only the top-5 fill reads the clustifier's class probabilities: no softmax otherwise.
        class_probs = softmax(shared.class_logits, axis=1) if self.fill == "clustifier" else None
        activations = [self.activator.select(p, float(t)) for p, t in zip(cluster_probs, taus, strict=True)]
        t3 = time.perf_counter()
        head_logits = self._run_heads(shared.features, activations)
        t4 = time.perf_counter()
        m = self.manifest
        predictions = []
        for i, act in enumerate(activations):
            scores = combine(act, head_logits[i], self.clusters, self.num_classes,
                             self.combination)
            if self.fill == "clustifier":
                scores = fill_unrun(scores, act, self.clusters, class_probs[i])
            heads = sum(self.head_flops[h] for h in act.heads)
            flops = Flops(trunk=m.trunk.flops, clustifier=m.clustifier.flops, heads=heads,
                          original=m.original.flops, total=m.shared_flops() + heads)
            predictions.append(Prediction(scores, flops, act, cluster_probs[i],
                                          None if class_probs is None else class_probs[i]))
        t5 = time.perf_counter()
        return BatchResult(predictions, {"activator": t3 - t2, "heads": t4 - t3,
                                         "combine": t5 - t4})

    def head_logits(self, head: int, features: np.ndarray) -> np.ndarray:
        """One head's logits (N, |cluster|) on host trunk features: for diagnostics (every head on
        every image, whatever the activator would pick)."""
        return self.backend.head(head, features)

    def _run_heads(self, features: Any,
                   activations: list[Activation]) -> list[dict[int, np.ndarray]]:
        """Run each head once on just the images routed to it; per image, head → its logits.

        ``features`` is a host array, or a tensor on the backend's device: a head that takes the
        whole batch reads it in place; a subset is gathered from one host copy.
        """
        routed: dict[int, list[int]] = {}
        for i, act in enumerate(activations):
            for h in act.heads:
                routed.setdefault(h, []).append(i)
        groups = sorted(routed.items())
        host = None
        if any(len(idx) < len(activations) for _, idx in groups):
            host = self.backend.to_host(features)  # (N, C', H', W'), once per batch

        def run_head(group: tuple[int, list[int]], alone: bool = False) -> np.ndarray:
            h, idx = group
            batch = features if len(idx) == len(activations) else host[idx]
            return self.backend.head(h, batch, alone=alone)

        work = sum(len(idx) * self.head_flops[h] for h, idx in groups)
        if self._head_pool is not None and len(groups) > 1 and work >= self.heads_at_once_flops:
            results = list(self._head_pool.map(run_head, groups))
        else:  # one after another: each may take every core
            results = [run_head(g, alone=True) for g in groups]
        out: list[dict[int, np.ndarray]] = [{} for _ in activations]
        for (h, idx), logits in zip(groups, results, strict=True):
            for row, i in enumerate(idx):
                out[i][h] = logits[row]
        return out

    # -- baseline path ----------------------------------------------------------------------
    def run_original(self, images: np.ndarray) -> BatchResult:
        """The original (unpartitioned) model on the same images, for A/B and the baseline."""
        x = normalize(images, self.manifest.input)
        t0 = time.perf_counter()
        scores = softmax(self.backend.original(x), axis=1)
        t1 = time.perf_counter()
        o = self.manifest.original.flops
        flops = Flops(trunk=0, clustifier=0, heads=0, original=o, total=o)
        preds = [Prediction(s, flops) for s in scores]
        return BatchResult(preds, {ORIGINAL_STAGE: t1 - t0})

    def warmup(self, largest_batch: int = 1) -> None:
        """Runs through every graph at the batch sizes the backend needs warmed (up to
        ``largest_batch``), so the first real requests pay no lazy initialisation."""
        s = self.manifest.input.size
        for n in self.backend.warm_sizes(largest_batch):
            images = np.zeros((n, s, s, 3), dtype=np.uint8)
            self.run(images, tau=1.0)  # τ = 1 runs every head
            self.run_original(images)
