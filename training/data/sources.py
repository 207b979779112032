"""`load_dataset`: pick the source named by the config, behind an on-disk cache of decoded arrays.

Decoding 100k JPEGs takes a while; the decoded uint8 arrays are saved as one uncompressed
.npz keyed by the source files (names, sizes, mtimes) and the config fields that change
the result, so a second load is a file read and any change to the data invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import cifar, folder, tarshards
from training.data.imageset import ImageSet
from training.data.synthetic import make_synthetic

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused


@dataclass
class DataConfig:
    # Where the images come from and how they are shaped; see load_dataset.
    kind: str = "synthetic"  # synthetic | folder | tar | cifar100
    path: str = ""  # folder: ImageFolder root | tar: shard dir or file | cifar-100-python dir
    image_size: int = 32  # images resized (shorter side, bilinear) + center-cropped to this square
    classes: int = 0  # keep only the first N classes (sorted ids); 0 = all
    max_per_class: int = 0  # cap images per class (first by sorted file name); 0 = all
    cache_dir: str = ".cache/datasets"  # decoded arrays cached here as .npz; "" disables
    # Synthetic dataset (kind="synthetic"): a planted super-class / class hierarchy.
    synthetic_superclasses: int = 4  # number of super-classes (the planted clusters)
    synthetic_classes_per_super: int = 3  # classes in each super-class
    synthetic_per_class: int = 120  # images per class
    synthetic_noise: float = 0.75  # class-cue jitter / gap between classes (higher = harder)
    seed: int = 0  # generator seed


Loader = Callable[..., ImageSet]  # (path, *, image_size, classes, max_per_class) -> ImageSet

# kind -> (list the files that determine the result, decode them); looked up at call time
LOADERS: dict[str, tuple[Callable[[Path], list[Path]], Loader]] = {
    "folder": (folder.source_files, folder.load_folder),
    "tar": (tarshards.source_files, tarshards.load_tar),
    "cifar100": (cifar.source_files, cifar.load_cifar100),
}


def load_dataset(cfg: DataConfig) -> ImageSet:
    """Load the dataset described by `cfg`, from the cache when its sources are unchanged."""
    if cfg.image_size <= 0 or cfg.classes < 0 or cfg.max_per_class < 0:
        raise ValueError(f"invalid data config: {cfg}")
    if cfg.kind == "synthetic":  # generated in well under a second: not worth caching
        return make_synthetic(
            superclasses=cfg.synthetic_superclasses,
            classes_per_super=cfg.synthetic_classes_per_super,
            per_class=cfg.synthetic_per_class,
            image_size=cfg.image_size,
            noise=cfg.synthetic_noise,
            seed=cfg.seed,
        )
    if cfg.kind not in LOADERS:
        raise ValueError(
            f"unknown dataset kind {cfg.kind!r}; expected synthetic, {', '.join(LOADERS)}"
        )
    if not cfg.path:
        raise ValueError(f"dataset kind {cfg.kind!r} needs a path")
    list_files, load = LOADERS[cfg.kind]
    root = Path(cfg.path)

    cache_file = _cache_file(cfg, root, list_files(root)) if cfg.cache_dir else None
    if cache_file is not None and cache_file.is_file():
        cached = _read_cache(cache_file)
        if cached is not None:
            return cached

    t0 = time.perf_counter()
    ds = load(root, image_size=cfg.image_size, classes=cfg.classes, max_per_class=cfg.max_per_class)
    seconds = time.perf_counter() - t0
    logger.info(
        "decoded %d images, %d classes from %s in %.1f s", len(ds), ds.num_classes, root, seconds
    )
    if cache_file is not None:
        _write_cache(cache_file, ds)
    return ds


def _cache_file(cfg: DataConfig, root: Path, files: list[Path]) -> Path:
    """Cache path named by a hash of the source files (names, sizes, mtimes) and config fields."""
    stats = []
    for f in files:
        st = f.stat()
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        stats.append([rel, st.st_size, st.st_mtime_ns])
    key = {
        "version": CACHE_VERSION,
        "kind": cfg.kind,
        "image_size": cfg.image_size,
        "classes": cfg.classes,
        "max_per_class": cfg.max_per_class,
        "files": stats,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = (root.resolve() if root.is_dir() else root.resolve().parent).name
    return Path(cfg.cache_dir) / f"{name}-{cfg.kind}-{cfg.image_size}px-{digest}.npz"


def _read_cache(path: Path) -> ImageSet | None:
    t0 = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as z:
            ds = ImageSet(
                images=z["images"],
                labels=z["labels"].astype(np.int64),
                class_ids=[str(s) for s in z["class_ids"]],
                class_names=[str(s) for s in z["class_names"]],
                name=str(z["name"]),
            )
    except (OSError, ValueError, KeyError) as exc:  # truncated or foreign file: rebuild it
        logger.warning("ignoring unreadable dataset cache %s: %s", path, exc)
        return None
    logger.info("loaded %d images from cache %s in %.1f s", len(ds), path, time.perf_counter() - t0)
    return ds


def _write_cache(path: Path, ds: ImageSet) -> None:
    """Write to a temporary name then rename, so a killed run never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(
            f,
            images=ds.images,
            labels=ds.labels,
            class_ids=np.array(ds.class_ids, dtype=str),
            class_names=np.array(ds.class_names, dtype=str),
            name=np.array(ds.name),
        )
    os.replace(tmp, path)
    logger.info("cached %s (%.1f MB)", path, path.stat().st_size / 1e6)
