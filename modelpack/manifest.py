"""The model-package manifest: the contract between training/export and serving.

A model package is a directory holding ``manifest.json``, ``trunk.onnx``, ``clustifier.onnx``,
one ONNX file per head and ``original.onnx``. The manifest is the only source of preprocessing,
labels, clusters, FLOPs and checksums: training writes it, export completes it, the service reads
it. Everything is validated on load so a broken package fails loudly at start-up, not mid-request.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1


class PackageError(RuntimeError):
    """A model package is missing, malformed or does not match its checksums."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How to turn an image into the network's input tensor (timm's pretrained-cfg idea)."""

    size: int = Field(gt=0, description="Square side in pixels after resize + centre crop.")
    mean: tuple[float, float, float] = Field(description="Per-channel mean of pixel/255 (RGB).")
    std: tuple[float, float, float] = Field(description="Per-channel std of pixel/255 (RGB).")
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB"] = "RGB"
    resize: Literal["shorter_side_center_crop"] = "shorter_side_center_crop"
    interpolation: Literal["bilinear"] = "bilinear"

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("std entries must be > 0")
        return v


def plain_file_name(name: str) -> str:
    """A package names its files by plain names: no directory part, no leading dot, no NUL, so
    nothing a manifest names can be looked up outside its package (``..``, ``/etc/...``)."""
    if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise ValueError(f"a package file must be a plain file name inside the package, got "
                         f"{name[:80]!r}")
    return name


class Component(_Strict):
    """One ONNX file of the package and what it costs per image."""

    file: str = Field(description="File name inside the package directory.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    flops: int = Field(ge=0, description="FLOPs per image (2 x multiply-accumulates).")
    params: int = Field(ge=0, description="Number of parameters.")
    input_name: str
    output_name: str
    input_shape: list[int | str] = Field(description="Input shape, 'N' for the batch axis.")
    output_shape: list[int | str] = Field(description="Output shape, 'N' for the batch axis.")
    architecture: str = Field(default="", description="Human-readable architecture name.")
    latency_ms: dict[int, float] = Field(
        default_factory=dict, description="Batch size -> median milliseconds of one run on the "
        "serving runtime, measured at export (HeadSelection.timing says where and how).")
    class_output: str = Field(default="", description="Clustifier only: the output holding its "
                              "class logits (all classes), used by ActivatorSpec.fill.")

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return plain_file_name(v)


class Cluster(_Strict):
    """A hyper-class: its member classes (indices into class_names, in head output order)."""

    index: int = Field(ge=0)
    classes: list[int] = Field(min_length=1)
    head: Component


class ActivatorSpec(_Strict):
    """Defaults for ``modelpack.activator.Activator``."""

    default_tau: float = Field(ge=0.0, le=1.0)
    ranking: Literal["confusion", "probability"] = "confusion"
    weighting: Literal["confusion", "probability"] = "confusion"
    combination: Literal["eq3", "joint"] = Field(
        default="eq3", description="eq3: the paper's w_i × softmax(H_i); joint: one softmax over "
        "the logits of all heads run (modelpack.activator.combine).")
    smoothing: float = Field(default=1.0, ge=0.0)
    fill: Literal["none", "clustifier"] = Field(
        default="none", description="Scores of the classes of heads not run. none: 0. clustifier: "
        "the clustifier's own class probability; the classes of heads run share the clustifier's "
        "probability mass on them as the heads say (needs clustifier.class_output).")
    fill_reason: str = Field(default="", description="Why fill was chosen (calibration split).")
    default_tau_reason: str = Field(default="", description="Why default_tau was chosen (from "
                                    "the τ sweep), for the model card and GET /v1/model.")


class Accuracy(_Strict):
    top1: float = Field(ge=0.0, le=1.0)
    top5: float = Field(ge=0.0, le=1.0)


class PrecisionRow(_Strict):
    tau: float = Field(ge=0.0, le=1.0)
    top1: float
    top5: float


class PrecisionSweep(_Strict):
    """The τ sweep's accuracy computed on another backend and precision (OpenVINO bf16): what
    serving there gives up, beside the fp32 sweep (routing and FLOPs are the same)."""

    backend: str
    precision: str
    original: Accuracy
    rows: list[PrecisionRow]


class SweepRow(_Strict):
    """One τ of the offline sweep: the columns of paper 002's Table 2 and more."""

    tau: float = Field(ge=0.0, le=1.0)
    top1: float
    top5: float
    mean_flops: float = Field(description="Mean FLOPs per image (trunk + clustifier + heads run).")
    flop_saving: float = Field(description="1 - mean_flops / original FLOPs.")
    mean_heads: float
    heads_histogram: list[int] = Field(
        description="heads_histogram[n-1] = number of images that ran exactly n heads."
    )
    cluster_accuracy: float = Field(description="Fraction of images whose true cluster was run.")
    top1_gain: float = Field(description="top1 - original model's top1 (paper's 'Acc. Gain').")


class TimingInfo(_Strict):
    """Where the export measured ``latency_ms``: times are only comparable within one package."""

    runtime: str = Field(description="e.g. 'onnxruntime 1.23.2 CPUExecutionProvider'.")
    threads: int = Field(ge=0, description="Intra-op threads (0 = one per core).")
    batch_sizes: list[int] = Field(min_length=1)
    repetitions: int = Field(ge=1, description="Interleaved rounds; latency_ms is their median.")
    cpu: str = Field(default="", description="Processor the times were measured on.")


class HeadCandidate(_Strict):
    """One trained head of the head family for one cluster, as the selection saw it."""

    cluster: int = Field(ge=0)
    arch: str
    accuracy: float = Field(ge=0.0, le=1.0, description="Top-1 within the cluster, calibration split.")
    flops: int = Field(ge=0)
    latency_ms: dict[int, float] = Field(default_factory=dict)
    cost: float = Field(description="What the selection minimised (relative time or FLOPs).")
    chosen: bool = False


class HeadSelection(_Strict):
    """How each cluster's head was picked: the cheapest within ``tolerance`` of the best."""

    cost: Literal["time", "flops"] = Field(description="time: sum over batch sizes of the "
                                           "candidate's latency / the original's; flops: FLOPs.")
    tolerance: float = Field(ge=0.0, le=1.0)
    timing: TimingInfo | None = None
    candidates: list[HeadCandidate] = Field(default_factory=list)


class SplitPoint(_Strict):
    """The trunk cut after one stage of the original, as timed at export: the floor of what the
    conditional path costs at that cut (every image pays the trunk)."""

    split_after: str
    trunk_flops: int = Field(ge=0)
    trunk_latency_ms: dict[int, float] = Field(default_factory=dict)
    chosen: bool = False


class TrainingInfo(_Strict):
    dataset: str
    num_classes: int
    train_images: int
    calib_images: int
    val_images: int
    split_seed: int
    original_accuracy: Accuracy = Field(description="Original model on the validation split.")
    clustifier_accuracy: float = Field(ge=0.0, le=1.0, description="On the validation split.")
    config: dict = Field(default_factory=dict, description="The exact run config.")


class Manifest(_Strict):
    """Everything the service needs to know about a package, validated on load."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    created: str = Field(description="ISO-8601 time the package was written.")
    class_ids: list[str] = Field(min_length=2)
    class_names: list[str] = Field(min_length=2)
    input: InputSpec
    trunk: Component
    clustifier: Component
    original: Component
    clusters: list[Cluster] = Field(min_length=1)
    clustifier_confusion: list[list[int]] = Field(
        description="Clustifier confusion counts on held-out data, [true cluster][predicted]."
    )
    activator: ActivatorSpec
    tau_sweep: list[SweepRow] = Field(default_factory=list)
    precision_sweeps: list[PrecisionSweep] = Field(
        default_factory=list, description="The sweep's accuracy on other backends/precisions.")
    training: TrainingInfo
    head_selection: HeadSelection | None = None
    split_points: list[SplitPoint] = Field(default_factory=list)
    extra_files: dict[str, str] = Field(
        default_factory=dict, description="Other files (plots, model card) -> sha256."
    )

    @field_validator("extra_files")
    @classmethod
    def _plain_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            plain_file_name(name)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        n = len(self.class_names)
        if len(self.class_ids) != n:
            raise ValueError(f"{len(self.class_ids)} class_ids but {n} class_names")
        if len(set(self.class_ids)) != n:
            raise ValueError("class_ids must be unique")
        k = len(self.clusters)
        if [c.index for c in self.clusters] != list(range(k)):
            raise ValueError("clusters must be listed in index order 0..K-1")
        covered: set[int] = set()
        for c in self.clusters:
            bad = [i for i in c.classes if not 0 <= i < n]
            if bad:
                raise ValueError(f"cluster {c.index} names class indices out of range: {bad}")
            if len(set(c.classes)) != len(c.classes):
                raise ValueError(f"cluster {c.index} lists a class twice")
            covered.update(c.classes)
        if len(covered) != n:
            missing = sorted(set(range(n)) - covered)[:10]
            raise ValueError(f"classes not in any cluster: {missing}")
        cm = self.clustifier_confusion
        if len(cm) != k or any(len(row) != k for row in cm):
            raise ValueError(f"clustifier_confusion must be {k}x{k}")
        if any(x < 0 for row in cm for x in row):
            raise ValueError("clustifier_confusion counts must be >= 0")
        if self.activator.fill == "clustifier" and not self.clustifier.class_output:
            raise ValueError("activator.fill = 'clustifier' needs a clustifier with class logits "
                             "(clustifier.class_output); re-export the package or set fill 'none'")
        files = [c.file for c in self.components().values()]
        if len(set(files)) != len(files):
            raise ValueError("two components share one file")
        return self

    def components(self) -> dict[str, Component]:
        """All ONNX components by role: trunk, clustifier, original, head0, head1, ..."""
        out = {"trunk": self.trunk, "clustifier": self.clustifier, "original": self.original}
        out.update({f"head{c.index}": c.head for c in self.clusters})
        return out

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)

    @property
    def cluster_members(self) -> list[list[int]]:
        return [list(c.classes) for c in self.clusters]

    def shared_flops(self) -> int:
        """FLOPs every image pays in conditional mode: trunk + clustifier."""
        return self.trunk.flops + self.clustifier.flops



def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(package_dir: Path) -> Manifest:
    """Parse and validate ``manifest.json`` (schema only, files not checked)."""
    path = Path(package_dir) / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(
            f"no {MANIFEST_FILE} in {package_dir}: point the model directory at an exported "
            "package (python -m export ...)"
        )
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise PackageError(f"{path} does not match the manifest schema:\n{e}") from e


def verify_files(manifest: Manifest, package_dir: Path) -> None:
    """Check every file the manifest names exists and matches its sha256."""
    package_dir = Path(package_dir)
    expected = {c.file: c.sha256 for c in manifest.components().values()}
    expected.update(manifest.extra_files)
    problems = []
    root = package_dir.resolve()
    for name, digest in expected.items():
        path = package_dir / name
        if not path.exists() and not path.is_symlink():
            problems.append(f"missing file {name}")
        elif not _regular_file_inside(path, root):  # a FIFO, a device, a link out: never read
            problems.append(f"{name} is not a regular file inside the package")
        elif sha256_file(path) != digest:
            problems.append(f"sha256 mismatch for {name} (file changed after export?)")
    if problems:
        raise PackageError(f"model package {package_dir} is broken: " + "; ".join(problems))


def _regular_file_inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved.parent == root and stat.S_ISREG(resolved.stat().st_mode)


def load_manifest(package_dir: Path, *, verify: bool = True) -> Manifest:
    """Read, validate and (by default) checksum a package."""
    manifest = read_manifest(package_dir)
    if verify:
        verify_files(manifest, package_dir)
    return manifest


def write_manifest(manifest: Manifest, package_dir: Path) -> Path:
    path = Path(package_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path


def copy_package(src: Path, dst: Path, *, version: str | None = None) -> Path:
    """Copy the package ``src`` to ``dst``, its manifest's version set to ``version`` if given.

    ``manifest.json`` is not among the checksummed files, so the copy stays a valid package; two
    copies with different versions tell apart which one answered (reload tests, the soak).
    """
    shutil.copytree(src, dst)
    if version is not None:
        manifest = read_manifest(dst)
        write_manifest(manifest.model_copy(update={"version": version}), dst)
    return dst


def default_model_dir() -> Path:
    """The shipped default: the Tiny-ImageNet-200 package when present, else the synthetic one."""
    for candidate in (Path("models/tiny-imagenet-200"), Path("models/synthetic")):
        if (candidate / "manifest.json").is_file():
            return candidate
    return Path("models/tiny-imagenet-200")
