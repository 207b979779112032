"""Tar-shard source: gzipped or plain tars whose members are `<anything>/<class_id>/<file>`.

This is how Tiny-ImageNet is stored here (`train-0N.tar.gz` + `wnids.txt` + `words.txt`).
Shards are streamed, never extracted: a 100k-image dataset would otherwise leave 100k
small files behind, and reading the compressed stream is faster than writing them.
"""

from __future__ import annotations

import logging
import multiprocessing
import tarfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from training.data.imageset import (
    ImageSet,
    RawItem,
    available_cpus,
    build_imageset,
    has_image_extension,
    unique_names,
)

logger = logging.getLogger(__name__)

_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _layout(path: Path) -> tuple[list[Path], Path]:
    """(shards, directory holding wnids.txt / words.txt) for a shard file or a directory of them."""
    if path.is_file():
        return [path], path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"tar dataset path {path} does not exist")
    shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_SHARD_SUFFIXES))
    if not shards:
        raise ValueError(f"no *.tar / *.tar.gz shards in {path}")
    return shards, path


def source_files(path: Path) -> list[Path]:
    """The shards plus the id and name lists, whose contents decide labels and names."""
    shards, meta = _layout(path)
    return shards + [p for p in (meta / "wnids.txt", meta / "words.txt") if p.is_file()]


def _read_wnids(meta: Path) -> list[str] | None:
    f = meta / "wnids.txt"
    if not f.is_file():
        return None
    return sorted({line.strip() for line in f.read_text().splitlines() if line.strip()})


def _read_words(meta: Path) -> dict[str, str]:
    """wnid -> first synonym ("Egyptian cat" from "Egyptian cat, ..."); empty if no words.txt."""
    f = meta / "words.txt"
    if not f.is_file():
        return {}
    words: dict[str, str] = {}
    for line in f.read_text().splitlines():
        wnid, _, names = line.partition("\t")
        first = names.split(",")[0].strip()
        if wnid.strip() and first:
            words[wnid.strip()] = first
    return words


def _read_shard(args: tuple[Path, frozenset[str] | None]) -> list[RawItem]:
    """Encoded bytes of the image members of one shard whose class is in `keep` (None = all)."""
    shard, keep = args
    items: list[RawItem] = []
    with tarfile.open(shard, mode="r|*") as tf:
        for member in tf:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) < 2 or not has_image_extension(parts[-1]):
                continue
            class_id = parts[-2]
            if keep is not None and class_id not in keep:
                continue
            f = tf.extractfile(member)
            if f is not None:
                items.append(RawItem(class_id, parts[-1], f.read()))
    return items


def _read_shards(shards: list[Path], keep: frozenset[str] | None) -> list[RawItem]:
    tasks = [(s, keep) for s in shards]
    items: list[RawItem] = []
    workers = min(available_cpus(), len(shards))
    with tqdm(total=len(shards), desc="read shards", unit="shard") as bar:
        if workers == 1:
            for task in tasks:
                items.extend(_read_shard(task))
                bar.update(1)
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                for shard_items in pool.imap(_read_shard, tasks):
                    items.extend(shard_items)
                    bar.update(1)
    return items


def load_tar(path: Path, *, image_size: int, classes: int, max_per_class: int) -> ImageSet:
    """Decode the first `classes` classes (0 = all, sorted ids) from the shards at `path`.

    Class ids come from `wnids.txt` when present (so a class missing from the shards is an
    error rather than a silent shift of every later label), else from the member paths.
    """
    shards, meta = _layout(path)
    wnids = _read_wnids(meta)
    keep = None
    if wnids is not None:
        wnids = wnids[:classes] if classes > 0 else wnids
        keep = frozenset(wnids)
    items = _read_shards(shards, keep)
    if wnids is None:
        found = sorted({it.class_id for it in items})
        wnids = found[:classes] if classes > 0 else found
    words = _read_words(meta)
    names = unique_names([words.get(w, w) for w in wnids], wnids)
    logger.info(
        "read %d images of %d classes from %d shards in %s",
        len(items),
        len(wnids),
        len(shards),
        path,
    )
    return build_imageset(
        items,
        wnids,
        names,
        image_size=image_size,
        max_per_class=max_per_class,
        name=meta.resolve().name,
    )
