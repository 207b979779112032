"""Pydantic request/response models: what ``/docs`` shows and what clients can rely on."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    Field,
)

from modelpack.manifest import ActivatorSpec, Component, InputSpec, Manifest, SweepRow, TrainingInfo
from service.outcome import ClassifyOutcome, ImageOutcome, Mode


# -- errors --------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_image.",
                      examples=["invalid_image"])
    message: str = Field(description="What was wrong and what to do.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI ``responses=`` entries documenting the JSON error shape for ``codes``."""
    return {code: {"model": ErrorResponse} for code in codes}


# -- /classify -----------------------------------------------------------------------------
class ModelRef(BaseModel):
    name: str
    version: str


class Label(BaseModel):
    index: int = Field(description="Class index (position in the model's class list).")
    class_id: str = Field(description="Dataset class id, e.g. a WordNet id.")
    class_name: str
    score: float = Field(description="Combined score (Eq. 3 in conditional mode); scores sum to 1.")


class HeadRun(BaseModel):
    head: int = Field(description="Cluster/head index.")
    weight: float = Field(description="Eq. 3 weight of this head; weights sum to 1.")
    flops: int = Field(description="FLOPs of this head per image.")


class FlopsReport(BaseModel):
    trunk: int
    clustifier: int
    heads: int = Field(description="Sum over the heads run.")
    total: int = Field(description="FLOPs executed for this image.")
    original: int = Field(description="FLOPs of the original model on one image.")
    saving: float = Field(description="1 - total / original.")


class Latency(BaseModel):
    """Seconds per stage. Stages that did not run in this mode are null; where the backend
    runs trunk and clustifier as one graph (OpenVINO), ``trunk`` covers both and
    ``clustifier`` is null."""

    decode: float
    preprocess: float
    trunk: float | None = None
    clustifier: float | None = None
    activator: float | None = None
    heads: float | None = None
    combine: float | None = None
    original: float | None = Field(default=None, description="Original model (original mode).")
    total: float


class ImageResult(BaseModel):
    filename: str | None = Field(description="Multipart file name; null for a raw body.")
    predictions: list[Label] = Field(description="The top_k classes, best first.")
    heads: list[HeadRun] | None = Field(
        description="Heads run, in the order the activator added them; null in original mode.")
    cluster_probs: list[float] | None = Field(
        description="Clustifier softmax, one entry per cluster; null in original mode.")
    flops: FlopsReport
    latency: Latency = Field(
        description="This image's decode/preprocess; inference stages are those of the batch "
        "the request's images ran in together; total = decode + preprocess + inference.")


class ClassifyResponse(BaseModel):
    model: ModelRef
    mode: Mode
    tau: float | None = Field(description="τ used (null in original mode).")
    top_k: int = Field(description="Labels returned per image (top_k clamped to num_classes).")
    results: list[ImageResult] = Field(description="One entry per image, in request order.")
    latency: Latency = Field(description="Whole request: decode/preprocess summed over images; "
                             "total = wall time in the service, as in Server-Timing.")


def _latency(decode: float, preprocess: float, stages: dict[str, float], total: float) -> Latency:
    inference = {k: v for k, v in stages.items() if k not in ("decode", "preprocess")}
    return Latency(decode=decode, preprocess=preprocess, total=total, **inference)


def _image_result(img: ImageOutcome, outcome: ClassifyOutcome, manifest: Manifest,
                  top_k: int) -> ImageResult:
    p = img.prediction
    order = np.argsort(-p.scores, kind="stable")[:top_k]
    labels = [Label(index=int(i), class_id=manifest.class_ids[i], class_name=manifest.class_names[i],
                    score=float(p.scores[i])) for i in order]
    heads = None
    if p.activation is not None:
        heads = [HeadRun(head=h, weight=w, flops=manifest.clusters[h].head.flops)
                 for h, w in zip(p.activation.heads, p.activation.weights, strict=True)]
    inference = {k: v for k, v in outcome.stage_seconds.items() if k not in ("decode", "preprocess")}
    f = p.flops
    return ImageResult(
        filename=img.filename,
        predictions=labels,
        heads=heads,
        cluster_probs=None if p.cluster_probs is None else [float(x) for x in p.cluster_probs],
        flops=FlopsReport(trunk=f.trunk, clustifier=f.clustifier, heads=f.heads, total=f.total,
                          original=f.original, saving=f.saving),
        latency=_latency(img.decode_seconds, img.preprocess_seconds, inference,
                         img.decode_seconds + img.preprocess_seconds + outcome.inference_seconds),
    )


def classify_response(outcome: ClassifyOutcome, top_k: int, total_seconds: float
                      ) -> ClassifyResponse:
    manifest = outcome.manifest
    top_k = min(top_k, len(manifest.class_names))
    s = outcome.stage_seconds
    return ClassifyResponse(
        model=ModelRef(name=manifest.name, version=manifest.version),
        mode=outcome.mode,
        tau=outcome.tau,
        top_k=top_k,
        results=[_image_result(img, outcome, manifest, top_k) for img in outcome.images],
        latency=_latency(s["decode"], s["preprocess"], s, total_seconds),
    )


# -- /v1/model -----------------------------------------------------------------------------
class ComponentInfo(BaseModel):
    file: str
    flops: int
    params: int
    architecture: str


class ClassInfo(BaseModel):
    index: int
    class_id: str
    class_name: str
    clusters: list[int] = Field(description="Clusters (heads) this class belongs to.")


class ClusterInfo(BaseModel):
    index: int
    class_names: list[str]
    class_indices: list[int]
    head: ComponentInfo


class ModelFlops(BaseModel):
    trunk: int
    clustifier: int
    heads: list[int] = Field(description="FLOPs of each head, by head index.")
    original: int
    shared: int = Field(description="trunk + clustifier: what every image pays.")
    all_heads: int = Field(description="shared + every head: the cost at τ = 1.")


class TauInfo(BaseModel):
    default: float = Field(description="The package's default τ.")
    current: float = Field(description="τ applied to requests that give none.")


class BackendInfo(BaseModel):
    name: Literal["onnxruntime", "openvino"]
    precision: Literal["fp32", "bf16"] = Field(description="What the graphs compute in.")
    providers: list[str] = Field(description="ONNX Runtime execution providers in use; "
                                 "OpenVINO: its device (CPU).")


class ModelInfo(BaseModel):
    name: str
    version: str
    created: str
    num_classes: int
    num_clusters: int
    classes: list[ClassInfo]
    clusters: list[ClusterInfo]
    input: InputSpec
    flops: ModelFlops
    components: dict[str, ComponentInfo] = Field(description="trunk, clustifier, original, headN.")
    tau: TauInfo
    activator: ActivatorSpec
    tau_sweep: list[SweepRow]
    training: TrainingInfo
    backend: BackendInfo = Field(description="What runs the graphs, and in what precision.")


def _component(c: Component) -> ComponentInfo:
    return ComponentInfo(file=c.file, flops=c.flops, params=c.params, architecture=c.architecture)


def model_info(manifest: Manifest, current_tau: float, backend: BackendInfo) -> ModelInfo:
    m = manifest
    member_of: dict[int, list[int]] = {}
    for c in m.clusters:
        for i in c.classes:
            member_of.setdefault(i, []).append(c.index)
    heads = [c.head.flops for c in m.clusters]
    return ModelInfo(
        name=m.name, version=m.version, created=m.created,
        num_classes=len(m.class_names), num_clusters=m.num_clusters,
        classes=[ClassInfo(index=i, class_id=cid, class_name=name, clusters=member_of.get(i, []))
                 for i, (cid, name) in enumerate(zip(m.class_ids, m.class_names, strict=True))],
        clusters=[ClusterInfo(index=c.index, class_names=[m.class_names[i] for i in c.classes],
                              class_indices=list(c.classes), head=_component(c.head))
                  for c in m.clusters],
        input=m.input,
        flops=ModelFlops(trunk=m.trunk.flops, clustifier=m.clustifier.flops, heads=heads,
                         original=m.original.flops, shared=m.shared_flops(),
                         all_heads=m.shared_flops() + sum(heads)),
        components={role: _component(c) for role, c in m.components().items()},
        tau=TauInfo(default=m.activator.default_tau, current=current_tau),
        activator=m.activator,
        tau_sweep=list(m.tau_sweep),
        training=m.training,
        backend=backend,
    )


# -- health --------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    model: ModelRef | None = None
