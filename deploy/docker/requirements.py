"""Print the serving requirements of ``pyproject.toml`` for one image flavour, one per line.

    python requirements.py cpu   # [project].dependencies as they are (onnxruntime)
    python requirements.py gpu   # the same, with onnxruntime replaced by the `gpu` extra

The Dockerfile installs these into the image's venv before the project's own wheel (installed with
``--no-deps``), so dependency layers are cached until ``pyproject.toml`` changes. onnxruntime and
onnxruntime-gpu install the same ``onnxruntime`` module and must never both be installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

CPU_RUNTIME = "onnxruntime"


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement (``onnxruntime>=1.18`` -> ...)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict, flavour: str) -> list[str]:
    project = pyproject["project"]
    deps = list(project["dependencies"])
    if flavour == "cpu":
        return deps
    if flavour == "gpu":
        gpu = list(project["optional-dependencies"]["gpu"])
        return [d for d in deps if requirement_name(d) != CPU_RUNTIME] + gpu
    raise ValueError(f"unknown flavour {flavour!r}: expected cpu or gpu")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        sys.stderr.write("usage: requirements.py cpu|gpu [pyproject.toml]\n")
        return 2
    path = Path(argv[2] if len(argv) == 3 else "pyproject.toml")
    with path.open("rb") as f:
        pyproject = tomllib.load(f)
    sys.stdout.write("".join(f"{r}\n" for r in requirements(pyproject, argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
