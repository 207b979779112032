"""Per-class train / calibration / validation split.

Calibration data (class similarity, clustifier confusion, head selection) must be held out
from training, and validation must be held out from both, or every number downstream is
optimistic. The split is stratified and seeded per class so it is identical on any machine
and does not shift when another class is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Splits:
    train: np.ndarray  # int64 indices into the ImageSet, sorted
    calib: np.ndarray  # held-out indices for calibration, sorted
    val: np.ndarray  # held-out indices for final evaluation only, sorted


def split_dataset(
    labels: np.ndarray, val_per_class: int, calib_per_class: int, seed: int
) -> Splits:
    """Take exactly `val_per_class` and `calib_per_class` random images per class; the rest train.

    Raises ValueError when a class has fewer than val + calib + 1 images (it needs at least
    one training image).
    """
    if val_per_class < 0 or calib_per_class < 0:
        raise ValueError("val_per_class and calib_per_class must be >= 0")
    labels = np.asarray(labels)
    need = val_per_class + calib_per_class + 1
    train, calib, val = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < need:
            raise ValueError(
                f"class {int(c)} has {len(idx)} images but needs {need} "
                f"({val_per_class} val + {calib_per_class} calib + 1 train)"
            )
        rng = np.random.default_rng([seed, int(c)])  # own stream per (seed, class)
        perm = rng.permutation(idx)
        val.append(perm[:val_per_class])
        calib.append(perm[val_per_class : val_per_class + calib_per_class])
        train.append(perm[val_per_class + calib_per_class :])

    def join(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)

    return Splits(train=join(train), calib=join(calib), val=join(val))
