"""The graphs of a package from a trained run: ONNX files, parity, FLOPs, measured times, the
head choice, and the manifest describing them (written by ``export.build``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import ExportCheckError, ExportReport, export_onnx
from export.selection import choose_heads
from export.storage import compare_outputs, store_float16
from export.timing import relative_time, time_graphs
from modelpack.manifest import (
    Accuracy,
    ActivatorSpec,
    Cluster,
    Component,
    HeadCandidate,
    HeadSelection,
    InputSpec,
    Manifest,
    SplitPoint,
    TimingInfo,
    TrainingInfo,
    sha256_file,
)
from training.artifacts import RunArtifacts
from training.config import config_to_dict
from training.data import to_tensor
from training.models.heads import WithClassLogits
from training.models.resnet import build_trunk

logger = logging.getLogger(__name__)


def export_graphs(art: RunArtifacts, tmp: Path, *, parity_images: int = 32) -> Manifest:
    """Export trunk, clustifier, heads and the original model of ``art`` into the empty ``tmp``.

    Every candidate head is exported and checked, then all graphs are timed side by side on the
    serving runtime; per cluster the cheapest candidate within ``head_tolerance`` of the best is
    kept (``head_cost``: measured time or FLOPs), the others are dropped from the package.
    Returns the manifest of the files in ``tmp``, not yet written.
    """
    cfg = art.config
    original, trunk, clustifier, clusters = art.original, art.trunk, art.clustifier, art.clusters
    s = cfg.data.image_size
    val_images, _ = art.images("val")
    real = to_tensor(torch.from_numpy(val_images[:parity_images]), cfg.mean, cfg.std)
    with torch.no_grad():
        real_features = trunk(real)
    feature_shape = tuple(real_features.shape[1:])

    def export(module: nn.Module, name: str, shape: tuple[int, ...], x: torch.Tensor,
               input_name: str, output_name: str, extra: tuple[str, ...] = ()) -> ExportReport:
        report = export_onnx(module, tmp / name, input_shape=shape, input_name=input_name,
                             output_name=output_name, extra_outputs=extra,
                             opset=cfg.package.opset, real_inputs=x.numpy())
        if cfg.package.weights == "fp16":
            _to_float16(report.path, x.numpy())
        return report

    def component(report: ExportReport, arch: str, input_name: str, output_name: str,
                  latency_ms: dict[int, float]) -> Component:
        return Component(
            file=report.path.name, sha256=sha256_file(report.path), flops=report.flops,
            params=report.params, input_name=input_name, output_name=output_name,
            input_shape=report.input_shape, output_shape=report.output_shape, architecture=arch,
            latency_ms=latency_ms,
        )

    # A clustifier that pools class logits also exports them: the activator's top-5 fill.
    class_output = CLASS_OUTPUT if clustifier.cluster_pool is not None else None
    rc = original.cfg
    resnet_name = f"resnet(layers={list(rc.layers)}, width={rc.width}, stem_stride={rc.stem_stride})"
    reports = {
        "original": export(original, "original.onnx", (3, s, s), real, "image", "logits"),
        "trunk": export(trunk, "trunk.onnx", (3, s, s), real, "image", "features"),
        "clustifier": export(clustifier if class_output is None else WithClassLogits(clustifier),
                             "clustifier.onnx", feature_shape, real_features, "features", "logits",
                             () if class_output is None else (class_output,)),
    }
    (tmp / CANDIDATES).mkdir()
    for cand in art.head_candidates:
        head = art.load_head(cand.cluster, cand.arch)
        reports[_key(cand.cluster, cand.arch)] = export(
            head, f"{CANDIDATES}/cluster{cand.cluster}_{cand.arch}.onnx", feature_shape,
            real_features, "features", "logits")
    # The trunk cut after every other stage too: the floor of the conditional path at each cut.
    cuts = [n for n in original.stage_names[1:-1] if n != cfg.split_after]
    for name in cuts:
        reports[f"trunk_{name}"] = export(build_trunk(original, name),
                                          f"{CANDIDATES}/trunk_{name}.onnx", (3, s, s), real,
                                          "image", "features")
    shapes = {k: feature_shape if k == "clustifier" or k.startswith("cluster") else (3, s, s)
              for k in reports}
    latency, timing = time_graphs({k: r.path for k, r in reports.items()}, shapes,
                                  threads=cfg.threads)
    selection = _select_heads(art, reports, latency, timing)
    components = {k: component(reports[k], name, i, o, latency[k]) for k, name, i, o in (
        ("original", resnet_name, "image", "logits"),
        ("trunk", f"{resnet_name} stem..{cfg.split_after}", "image", "features"),
        ("clustifier", f"clustifier {cfg.clustifier}", "features", "logits"))}
    orig, trunk_c = components["original"], components["trunk"]
    clus_c = components["clustifier"].model_copy(update={"class_output": class_output or ""})
    cluster_entries = []
    for cand in (c for c in selection.candidates if c.chosen):
        key = _key(cand.cluster, cand.arch)
        head_file = reports[key].path.replace(tmp / f"head{cand.cluster}.onnx")
        report = dataclasses.replace(reports[key], path=head_file)
        cluster_entries.append(Cluster(index=cand.cluster, classes=clusters[cand.cluster],
                                       head=component(report, cand.arch, "features", "logits",
                                                      latency[key])))
    cluster_entries.sort(key=lambda c: c.index)
    split_points = sorted(
        [SplitPoint(split_after=name, trunk_flops=reports[f"trunk_{name}"].flops,
                    trunk_latency_ms=latency[f"trunk_{name}"]) for name in cuts]
        + [SplitPoint(split_after=cfg.split_after, trunk_flops=trunk_c.flops,
                      trunk_latency_ms=trunk_c.latency_ms, chosen=True)],
        key=lambda p: original.stage_names.index(p.split_after))
    shutil.rmtree(tmp / CANDIDATES)
    sizes = art.split_sizes
    manifest = Manifest(
        name=cfg.package.name,
        version=cfg.package.version,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        class_ids=art.class_ids,
        class_names=art.class_names,
        input=InputSpec(size=s, mean=cfg.mean, std=cfg.std),
        trunk=trunk_c,
        clustifier=clus_c,
        original=orig,
        clusters=cluster_entries,
        clustifier_confusion=art.clustifier_confusion,
        activator=ActivatorSpec(default_tau=cfg.package.default_tau, ranking=cfg.package.ranking,
                                weighting=cfg.package.weighting, smoothing=cfg.package.smoothing,
                                combination=cfg.package.combination),
        head_selection=selection,
        split_points=split_points,
        training=TrainingInfo(
            dataset=art.dataset_name, num_classes=art.num_classes,
            train_images=sizes.train, calib_images=sizes.calib, val_images=sizes.val,
            split_seed=cfg.seed, original_accuracy=Accuracy(**art.original_accuracy),
            clustifier_accuracy=art.clustifier_accuracy, config=config_to_dict(cfg),
        ),
    )
    logger.info("graphs exported to %s: original %.2f MFLOPs, trunk %.2f, clustifier %.2f, "
                "heads %s", tmp, orig.flops / 1e6, trunk_c.flops / 1e6, clus_c.flops / 1e6,
                [round(c.head.flops / 1e6, 2) for c in cluster_entries])
    return manifest


CLASS_OUTPUT = "class_logits"
CANDIDATES = "candidates"  # scratch folder of the package being written: every trained head


FP16_RTOL = 1e-2  # float16 weights may move an output by this fraction of its largest value


def _to_float16(path: Path, real: np.ndarray) -> None:
    """Store ``path``'s weights as float16 (export.storage), checked against the float32 graph."""
    fp32 = path.with_suffix(".fp32.onnx")
    shutil.copyfile(path, fp32)
    store_float16(path)
    diff, scale = compare_outputs(fp32, path, [np.ascontiguousarray(real, dtype=np.float32)])
    fp32.unlink()
    if diff > FP16_RTOL * max(scale, 1.0):
        raise ExportCheckError(f"{path.name}: float16 weights move its outputs by {diff:.2e} "
                               f"(largest output {scale:.2f}); store this package in fp32")
    logger.info("%s: weights stored as float16, max |Δ| vs float32 %.2e (largest output %.2f)",
                path.name, diff, scale)


def _key(cluster: int, arch: str) -> str:
    return f"cluster{cluster}_{arch}"


def _select_heads(art: RunArtifacts, reports: dict[str, ExportReport], latency: dict[str, dict[int, float]],
                  timing: TimingInfo) -> HeadSelection:
    """Every candidate with its measured cost; one per cluster chosen (``config.head_cost``)."""
    cfg = art.config
    candidates = []
    for cand in art.head_candidates:
        key = _key(cand.cluster, cand.arch)
        cost = relative_time(latency[key], latency["original"]) if cfg.head_cost == "time" \
            else float(reports[key].flops)
        candidates.append(HeadCandidate(cluster=cand.cluster, arch=cand.arch,
                                        accuracy=cand.accuracy, flops=reports[key].flops,
                                        latency_ms=latency[key], cost=cost))
    candidates = choose_heads(candidates, cfg.head_tolerance)
    for c in candidates:
        if c.chosen:
            logger.info("cluster %d: head %s (calib acc %.4f, %.2f MFLOPs, %s)", c.cluster, c.arch,
                        c.accuracy, c.flops / 1e6,
                        ", ".join(f"b{b} {ms:.3f} ms" for b, ms in c.latency_ms.items()))
    return HeadSelection(cost=cfg.head_cost, tolerance=cfg.head_tolerance, timing=timing,
                         candidates=candidates)

