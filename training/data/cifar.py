"""CIFAR-100 source: the `cifar-100-python` directory of pickles.

Only `train` is read; `test` stays untouched for independent evaluation. Fine labels are
used, with class ids = the fine label names sorted (they already are in the official meta).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from modelpack.preprocess import resize_center_crop
from training.data.imageset import ImageSet

_SIDE = 32  # CIFAR images are 32x32


def source_files(root: Path) -> list[Path]:
    return [root / "train", root / "meta"]


def _unpickle(path: Path) -> dict[bytes, object]:
    # The official format is a pickle; only load files you trust.
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar100(root: Path, *, image_size: int, classes: int, max_per_class: int) -> ImageSet:
    """Decode the training pickle, keeping the first `classes` fine classes (0 = all).

    With `max_per_class`, each class keeps its first rows by file name (by row order when
    the pickle has no `filenames`).
    """
    for f in source_files(root):
        if not f.is_file():
            raise FileNotFoundError(f"CIFAR-100 file {f} is missing")
    meta = _unpickle(root / "meta")
    train = _unpickle(root / "train")
    raw_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
    data = np.asarray(train[b"data"], dtype=np.uint8)  # (N, 3072), rows in CHW order
    old_labels = np.asarray(train[b"fine_labels"], dtype=np.int64)
    file_names = [
        n.decode() if isinstance(n, bytes) else str(n) for n in train.get(b"filenames", [])
    ]

    ids = sorted(raw_names)
    if classes > 0:
        ids = ids[:classes]
    new_of_old = np.array([ids.index(n) if n in ids else -1 for n in raw_names], dtype=np.int64)
    labels_all = new_of_old[old_labels]

    rows: list[np.ndarray] = []
    for label in range(len(ids)):
        members = np.flatnonzero(labels_all == label)
        if file_names:
            members = members[np.argsort([file_names[i] for i in members], kind="stable")]
        if max_per_class > 0:
            members = members[:max_per_class]
        if len(members) == 0:
            raise ValueError(f"CIFAR-100 class {ids[label]!r} has no images")
        rows.append(members)
    order = np.concatenate(rows)

    images = data[order].reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    if image_size != _SIDE:
        images = np.stack(
            [
                np.asarray(resize_center_crop(Image.fromarray(im), image_size))
                for im in tqdm(images, desc="resize cifar100", unit="img")
            ]
        )
    return ImageSet(np.ascontiguousarray(images), labels_all[order], ids, list(ids), "cifar100")
