"""The in-memory image dataset, and how listed image files become its rows.

Every source (folder, tar shards, CIFAR, synthetic) ends in an `ImageSet`: one uint8 array
of equally sized RGB images plus labels and class names, so training never cares where
the pixels came from. Folder and tar sources share `build_imageset`, so class selection,
per-class caps and row order follow one rule for both.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from modelpack.preprocess import resize_center_crop, to_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_CHUNK = 512  # images per task sent to a decode worker
_PARALLEL_MIN = 2048  # below this many images a process pool costs more than it saves


@dataclass
class ImageSet:
    """Decoded images of one dataset, all resized to one square size."""

    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64 class index into class_ids
    class_ids: list[str]  # stable ids (wnids, folder names), sorted
    class_names: list[str]  # human-readable names, unique; == class_ids when nothing better
    name: str  # e.g. "tiny-imagenet-200", "synthetic-4x3"

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}"
            )
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be ({len(self.images)},), got {self.labels.shape}")
        if len(self.class_ids) != len(self.class_names):
            raise ValueError("class_ids and class_names differ in length")

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> ImageSet:
        """Selected rows with the same classes, so label indices keep their meaning."""
        return ImageSet(
            self.images[idx], self.labels[idx], self.class_ids, self.class_names, self.name
        )


class RawItem(NamedTuple):
    """One listed, not yet decoded image."""

    class_id: str
    file_name: str  # sort key within its class
    source: bytes | str  # encoded file bytes, or a path to the file


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(source: bytes | str, size: int) -> np.ndarray:
    """Decode one encoded image to a (size, size, 3) uint8 RGB array, as the server would."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img = resize_center_crop(to_rgb(img), size)
        return np.asarray(img, dtype=np.uint8)


def _decode_chunk(args: tuple[list[bytes | str], int]) -> np.ndarray:
    sources, size = args
    return np.stack([decode_image(s, size) for s in sources])


def available_cpus() -> int:
    """CPUs this process may run on (not the machine's count, which containers inflate)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_many(sources: Sequence[bytes | str], size: int, *, desc: str) -> np.ndarray:
    """Decode images in order into one (N, size, size, 3) array, over a process pool if large."""
    out = np.empty((len(sources), size, size, 3), dtype=np.uint8)
    workers = available_cpus() if len(sources) >= _PARALLEL_MIN else 1
    with tqdm(total=len(sources), desc=desc, unit="img") as bar:
        if workers == 1:
            for i, src in enumerate(sources):
                out[i] = decode_image(src, size)
                bar.update(1)
            return out
        tasks = [(list(sources[i : i + _CHUNK]), size) for i in range(0, len(sources), _CHUNK)]
        with multiprocessing.get_context().Pool(workers) as pool:
            pos = 0
            for chunk in pool.imap(_decode_chunk, tasks):  # ordered, so rows stay in place
                out[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
                bar.update(len(chunk))
    return out


def unique_names(names: Sequence[str], ids: Sequence[str]) -> list[str]:
    """Append the id to every name that is shared, so a name always identifies one class."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [n if counts[n] == 1 else f"{n} ({i})" for n, i in zip(names, ids, strict=True)]


def build_imageset(
    items: Sequence[RawItem],
    class_ids: Sequence[str],
    class_names: Sequence[str],
    *,
    image_size: int,
    max_per_class: int,
    name: str,
) -> ImageSet:
    """Decode `items` of the given classes into an ImageSet.

    Rows are ordered by class index, then file name; with `max_per_class` each class
    keeps its first files by name, so the same files are chosen on every machine.
    Items of other classes are dropped; a class without images is an error, because a
    label that never occurs breaks splits and metrics later in ways that are hard to trace.
    """
    index = {cid: i for i, cid in enumerate(class_ids)}
    per_class: list[list[RawItem]] = [[] for _ in class_ids]
    for item in items:
        if item.class_id in index:
            per_class[index[item.class_id]].append(item)
    empty = [cid for cid, members in zip(class_ids, per_class, strict=True) if not members]
    if empty:
        raise ValueError(f"{len(empty)} classes have no images: {empty[:10]}")
    sources: list[bytes | str] = []
    labels: list[int] = []
    for label, members in enumerate(per_class):
        members.sort(key=lambda it: it.file_name)
        if max_per_class > 0:
            members = members[:max_per_class]
        sources.extend(it.source for it in members)
        labels.extend([label] * len(members))
    images = decode_many(sources, image_size, desc=f"decode {name}")
    return ImageSet(
        images, np.asarray(labels, dtype=np.int64), list(class_ids), list(class_names), name
    )
