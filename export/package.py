"""Write a model package from a finished training run: ONNX files + a validated manifest."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from export.onnx_export import ExportReport, export_onnx
from service.manifest import (
    Accuracy,
    ActivatorSpec,
    Cluster,
    Component,
    InputSpec,
    Manifest,
    TrainingInfo,
    load_manifest,
    sha256_file,
    write_manifest,
)
from training.config import config_to_dict
from training.data import to_tensor

if TYPE_CHECKING:
    from training.pipeline import Run

logger = logging.getLogger(__name__)


def export_run(run: Run, out_dir: Path, *, parity_images: int = 32) -> Manifest:
    """Export trunk, clustifier, chosen heads and the original model of ``run`` into ``out_dir``."""
    cfg = run.cfg
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    original = run.load_original()
    trunk = run.load_trunk()
    clustifier = run.load_clustifier()
    clusters = run.load_clusters()
    choices = run.head_choices()
    s = cfg.data.image_size
    val_images, _ = run.part("val")
    real = to_tensor(torch.from_numpy(val_images[:parity_images]), cfg.mean, cfg.std)
    with torch.no_grad():
        real_features = trunk(real)
    feature_shape = tuple(real_features.shape[1:])

    def export(module: nn.Module, name: str, shape: tuple[int, ...], x: torch.Tensor,
               input_name: str, output_name: str) -> ExportReport:
        return export_onnx(module, tmp / name, input_shape=shape, input_name=input_name,
                           output_name=output_name, opset=cfg.package.opset, real_inputs=x.numpy())

    def component(report: ExportReport, arch: str, input_name: str, output_name: str) -> Component:
        return Component(
            file=report.path.name, sha256=sha256_file(report.path), flops=report.flops,
            params=report.params, input_name=input_name, output_name=output_name,
            input_shape=report.input_shape, output_shape=report.output_shape, architecture=arch,
        )

    rc = original.cfg
    resnet_name = f"resnet(layers={list(rc.layers)}, width={rc.width}, stem_stride={rc.stem_stride})"
    orig = component(export(original, "original.onnx", (3, s, s), real, "image", "logits"),
                     resnet_name, "image", "logits")
    trunk_c = component(export(trunk, "trunk.onnx", (3, s, s), real, "image", "features"),
                        f"{resnet_name} stem..{cfg.split_after}", "image", "features")
    clus_c = component(export(clustifier, "clustifier.onnx", feature_shape, real_features,
                              "features", "logits"), f"clustifier {cfg.clustifier}", "features",
                       "logits")
    cluster_entries = []
    for choice in choices:
        head = run.load_head(choice.cluster, choice.arch)
        report = export(head, f"head{choice.cluster}.onnx", feature_shape, real_features,
                        "features", "logits")
        cluster_entries.append(Cluster(index=choice.cluster, classes=clusters[choice.cluster],
                                       head=component(report, choice.arch, "features", "logits")))
    confusion = json.loads((run.dir / "confusion.json").read_text())
    original_acc = torch.load(run.dir / "original.pt", map_location="cpu",
                              weights_only=False)["val_accuracy"]
    splits = run.splits
    manifest = Manifest(
        name=cfg.package.name,
        version=cfg.package.version,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        class_ids=run.dataset.class_ids,
        class_names=run.dataset.class_names,
        input=InputSpec(size=s, mean=cfg.mean, std=cfg.std),
        trunk=trunk_c,
        clustifier=clus_c,
        original=orig,
        clusters=cluster_entries,
        clustifier_confusion=confusion["calib"]["confusion"],
        activator=ActivatorSpec(default_tau=cfg.package.default_tau, ranking=cfg.package.ranking,
                                weighting=cfg.package.weighting, smoothing=cfg.package.smoothing,
                                combination=cfg.package.combination),
        training=TrainingInfo(
            dataset=run.dataset.name, num_classes=run.dataset.num_classes,
            train_images=len(splits.train), calib_images=len(splits.calib),
            val_images=len(splits.val), split_seed=cfg.seed,
            original_accuracy=Accuracy(**original_acc),
            clustifier_accuracy=confusion["val"]["accuracy"], config=config_to_dict(cfg),
        ),
    )
    write_manifest(manifest, tmp)
    load_manifest(tmp)  # what the service will do: schema, files, checksums
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    logger.info("package written to %s: original %.2f MFLOPs, trunk %.2f, clustifier %.2f, "
                "heads %s", out_dir, orig.flops / 1e6, trunk_c.flops / 1e6, clus_c.flops / 1e6,
                [round(c.head.flops / 1e6, 2) for c in cluster_entries])
    return manifest

