"""ImageFolder source: `root/<class_id>/<image files>`, class ids = sorted sub-directory names."""

from __future__ import annotations

from pathlib import Path

from training.data.imageset import ImageSet, RawItem, build_imageset, has_image_extension


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"folder dataset root {root} is not a directory")
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)
    if not dirs:
        raise ValueError(f"folder dataset root {root} has no class sub-directories")
    return dirs


def source_files(root: Path) -> list[Path]:
    """Every image file of every class, so adding or replacing one changes the cache key."""
    return [
        f
        for d in _class_dirs(root)
        for f in sorted(d.iterdir())
        if f.is_file() and has_image_extension(f.name)
    ]


def load_folder(root: Path, *, image_size: int, classes: int, max_per_class: int) -> ImageSet:
    """Decode the first `classes` classes (0 = all) of an ImageFolder tree."""
    dirs = _class_dirs(root)
    if classes > 0:
        dirs = dirs[:classes]
    items = [
        RawItem(d.name, f.name, str(f))
        for d in dirs
        for f in d.iterdir()
        if f.is_file() and has_image_extension(f.name)
    ]
    ids = [d.name for d in dirs]
    return build_imageset(
        items,
        ids,
        ids,
        image_size=image_size,
        max_per_class=max_per_class,
        name=root.resolve().name,
    )
