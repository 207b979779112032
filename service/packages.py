"""Which package directories ``POST /admin/reload`` may load: plain names inside the models root.

A client names a package by its directory name, never by a path. The name must be a plain name
(letters, digits, ``.``, ``_``, ``-``; no separator, no leading dot, so no ``..``); the directory
must exist in the models root; and neither it nor any file in it may resolve (through a symlink)
to a place outside the models root. What is in the package is then checked by the manifest's
schema and checksums when it is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from service.errors import Forbidden, InvalidParameter, NotFound

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PACKAGE_NAME = f"^{_NAME.pattern}$"  # the request schema's pattern


def resolve_package_dir(models_root: Path, name: str) -> Path:
    """The directory ``name`` inside ``models_root``, or a ``ServiceError`` saying why not."""
    if len(name) > 255 or not _NAME.fullmatch(name):
        raise InvalidParameter(
            f"package must be the plain name of a directory in the models root (letters, digits, "
            f"'.', '_', '-'; no path), got {name!r}")
    root = models_root.resolve()
    candidate = root / name
    if not candidate.exists():
        raise NotFound(f"no package directory {name!r} in the models root (CPCNN_MODELS_ROOT)",
                       code="package_not_found")
    resolved = candidate.resolve()
    if not _inside(resolved, root):
        raise Forbidden(f"package {name!r} resolves to a place outside the models root",
                        code="outside_models_root")
    if not resolved.is_dir():
        raise NotFound(f"{name!r} in the models root is not a directory",
                       code="package_not_found")
    escaping = sorted(entry.name for entry in resolved.iterdir()
                      if entry.is_symlink() and not _inside(entry.resolve(), root))
    if escaping:
        raise Forbidden(f"package {name!r} has files that link outside the models root: "
                        f"{escaping[:5]}", code="outside_models_root")
    return resolved


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)
