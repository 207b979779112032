"""The run configuration: typed dataclasses with visible defaults (nanoGPT style).

A run is configured by a TOML file (sections mirror the dataclasses) plus ``--set key=value``
overrides on the command line; an unknown key is an error, never silently ignored. The resolved
config is written to the run directory and stored in every checkpoint, so resuming never guesses.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from training.data import DataConfig
from training.models.heads import HeadArch
from training.models.resnet import ResNetConfig
from training.precision import PRECISIONS


@dataclass
class OptimConfig:
    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # images per step
    lr: float = 0.1  # peak learning rate (SGD, Nesterov momentum 0.9, one-cycle schedule)
    weight_decay: float = 5e-4  # L2 on conv/linear weights (not on BN or biases)
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    distill: float = 0.0  # weight of the distillation loss from the original model (0 = off)
    temperature: float = 4.0  # distillation temperature
    logit_match: float = 0.0  # weight of MSE(student logits, teacher logits): keeps a head's logits on the original's scale, so heads can be compared (combination = "joint")
    augment: bool = True  # random crop (reflect pad 4 px / 8 % of the side) + horizontal flip
    min_area: float = 1.0  # < 1: images (not cached features) get a random resized crop of at least this area fraction instead of the padded crop (scale augmentation against overfitting)
    progressive: list[int] = field(default_factory=list)  # input side for each of the first epochs (progressive resizing); later epochs use the full size
    precision: str = "fp32"  # fp32 | bf16 (autocast + channels_last, fp32 master weights; fp32 where the CPU lacks bf16)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 < self.min_area <= 1:
            raise ValueError(f"min_area must be in (0, 1] (1 = no scale augmentation), "
                             f"got {self.min_area}")


@dataclass
class ClusteringConfig:
    similarity: str = "indicator"  # indicator (002 Eq. 2) | confusion | affinity | codetection
    method: str = "spectral"  # spectral (002 Alg. 2) | linkage (003 Alg. 1, UPGMA)
    min_clusters: int = 2  # eigengap search bounds
    max_clusters: int = 16
    num_clusters: int = 0  # > 0 fixes the number of clusters (required for linkage)
    gamma: float = 0.0  # linkage overlap factor (0 = no overlap)


@dataclass
class PackageConfig:
    name: str = "cpcnn"  # package name in the manifest and the API
    version: str = "0.1.0"  # package version
    out_dir: str = ""  # where to write the package ("" = <run_dir>/package)
    default_tau: float = 0.7  # the paper's choice for CIFAR-100; used unless choose_tau
    choose_tau: bool = False  # pick default_tau from the sweep (export.sweep.choose_default_tau)
    choose_fill: bool = True  # score the classes of heads not run from the clustifier's class softmax when that helps top-5 on the calibration split (export.sweep.choose_fill)
    max_top1_loss: float = 0.01  # ... as the biggest FLOP saving within this top-1 loss
    ranking: str = "confusion"  # activator cluster ranking: confusion (paper) | probability
    weighting: str = "confusion"  # activator weights: confusion (paper, Eq. 3) | probability
    combination: str = "eq3"  # head scores: eq3 (paper) | joint (one softmax over the heads' logits)
    smoothing: float = 1.0  # Laplace smoothing of the clustifier confusion counts
    sweep_taus: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0])
    opset: int = 17  # ONNX opset
    weights: str = "fp32"  # how ONNX weights are stored: fp32 | fp16 (half the size; still computed in fp32: ONNX Runtime folds the casts at load)

    def __post_init__(self) -> None:
        if self.weights not in ("fp32", "fp16"):
            raise ValueError(f"package.weights must be 'fp32' or 'fp16', got {self.weights!r}")


def _default_family() -> list[HeadArch]:
    return [
        HeadArch("original"),
        HeadArch("bottleneck", ("bottleneck",), 0.5),
        HeadArch("bottleneck2", ("bottleneck", "bottleneck"), 0.5),
        HeadArch("compression", ("compression", "bottleneck"), 0.5),
    ]


@dataclass
class RunConfig:
    run_dir: str = "runs/synthetic"  # every artifact and checkpoint of the run goes here
    seed: int = 0  # seeds torch, numpy and the data split
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    data: DataConfig = field(default_factory=DataConfig)
    val_per_class: int = 20  # held out for final evaluation only (τ sweep, accuracies)
    calib_per_class: int = 20  # held out for similarity, clustifier confusion, head selection
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # input normalisation (pixel/255)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    model: ResNetConfig = field(default_factory=ResNetConfig)  # num_classes/input_size set from data
    original: OptimConfig = field(default_factory=OptimConfig)
    original_init: str = ""  # a trained original to start from: a package's original.onnx or a run's original.pt, same layout at the same or a narrower width (widened to [model].width without changing its function: training.models.widen); "" = from scratch
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    split_after: str = "layer2"  # last stage of the shared trunk
    clustifier: HeadArch = field(
        default_factory=lambda: HeadArch("clustifier", ("compression", "bottleneck"), 0.25))
    clustifier_optim: OptimConfig = field(default_factory=lambda: OptimConfig(distill=0.5))
    head_family: list[HeadArch] = field(default_factory=_default_family)
    head_optim: OptimConfig = field(default_factory=lambda: OptimConfig(distill=0.5))
    head_tolerance: float = 0.01  # pick the cheapest head within this accuracy of the best
    head_cost: str = "time"  # what "cheapest" means: time (measured at export on the serving runtime, batch 1 and 32) | flops
    feature_mirror: bool = True  # also cache trunk features of mirrored images (flip augmentation for clustifier and heads; doubles the cache)
    head_negatives: float = 0.0  # images of other clusters per member image a head also trains on (distillation only): teaches it the original's low logits off its cluster
    package: PackageConfig = field(default_factory=PackageConfig)

    def __post_init__(self) -> None:
        if self.head_cost not in HEAD_COSTS:
            raise ValueError(f"head_cost must be one of {HEAD_COSTS}, got {self.head_cost!r}")


HEAD_COSTS = ("time", "flops")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Turn a TOML/CLI value into the field's type (dataclasses, tuples, lists of HeadArch)."""
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a table, got {value!r}")
        return update(_default(tp), value, prefix=key + ".")
    origin = getattr(tp, "__origin__", None)
    if origin is list:
        (item,) = tp.__args__
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(value)
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float, str) and not isinstance(value, tp):
        raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _default(tp: type) -> Any:
    if tp is HeadArch:
        return HeadArch("head")
    return tp()


def update(obj: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` applied; unknown keys raise."""
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown config key {prefix}{key!r}; known: {sorted(names)}")
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = update(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(tp, value, prefix + key)
    return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=3`` → {"a": {"b": 3}}; the value is parsed as TOML (strings may be bare)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    cfg = RunConfig()
    if path:
        cfg = update(cfg, tomllib.loads(Path(path).read_text()))
    for text in overrides or []:
        cfg = update(cfg, parse_override(text))
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    return update(RunConfig(), d)
