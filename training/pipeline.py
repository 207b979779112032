"""The staged CP-CNN pipeline. Each stage writes its artifact into the run directory and is skipped
when that artifact exists, so an interrupted run resumes where it stopped (training stages also
resume mid-way from their per-epoch checkpoints).

Stages, in order:
1. original    — train the ResNet baseline                       → original.pt
2. similarity  — held-out softmax → class similarity (Eq. 2)     → similarity.npz
3. clustering  — Algorithm 2 (or linkage)                        → clusters.json, cluster_sizes.png
4. trunk       — freeze the original's first stages             → trunk.json
5. clustifier  — small net on trunk features → cluster           → clustifier.pt
6. heads       — per cluster, every family member               → heads/*.pt, heads.json
7. confusion   — clustifier confusion matrix on held-out data    → confusion.json

Training ends there. ``Run.artifacts()`` hands the trained parts to export (``python -m export
package RUN_DIR``: ONNX, parity, FLOPs, timed head choice, τ sweep, card, manifest).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from training import distributed as ddp
from training import precision as prec
from training.artifacts import HeadChoice, RunArtifacts, SplitSizes
from training.clustering import linkage_clusters, spectral_clusters
from training.config import RunConfig, config_from_dict, config_to_dict
from training.data import ImageSet, Splits, load_dataset, split_dataset, to_tensor
from training.engine import IGNORE, feature_transform, fit, image_transform, predict, topk_accuracy
from training.models.heads import ClusterPool, HeadNet
from training.models.resnet import ResNet, ResNetConfig, Trunk, build_trunk
from training.models.widen import widen_resnet
from training.onnx_import import import_original, onnx_stem_width, ort_max_difference
from training.similarity import class_similarity, confusion_matrix

logger = logging.getLogger(__name__)

TRAINED = ("original", "clustifier", "heads")  # under torchrun, every process runs these
STAGES = ("original", "similarity", "clustering", "trunk", "clustifier", "heads", "confusion")


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def module_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Per-image FLOPs with torch's own counter (2 × MACs of convs and matmuls)."""
    was_training = module.training
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, *input_shape))
    module.train(was_training)
    return int(counter.get_total_flops())


class Run:
    """One run directory: config, data, and the artifacts of every stage."""

    def __init__(self, cfg: RunConfig) -> None:
        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "config.json"
        if saved.exists():
            previous = json.loads(saved.read_text())
            # Fields that change what was trained must not differ on resume; threads and the
            # package (export) settings may.
            free = ("package", "threads")
            if {k: v for k, v in previous.items() if k not in free} != {
                    k: v for k, v in config_to_dict(cfg).items() if k not in free}:
                logger.warning("config differs from %s; stages already done keep their artifacts "
                               "(use a new run_dir or --force to redo them)", saved)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        """An existing run, with the exact config it ran with."""
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
        return cls(config_from_dict(json.loads(path.read_text())))

    def save_config(self) -> None:
        if ddp.is_main():
            _write_json(self.dir / "config.json", config_to_dict(self.cfg))

    # -- data -----------------------------------------------------------------------------------
    @cached_property
    def dataset(self) -> ImageSet:
        return load_dataset(self.cfg.data)

    @cached_property
    def splits(self) -> Splits:
        return split_dataset(self.dataset.labels, self.cfg.val_per_class, self.cfg.calib_per_class,
                             self.cfg.seed)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        idx = getattr(self.splits, name)
        return self.dataset.images[idx], self.dataset.labels[idx]

    @property
    def norm(self) -> dict:
        return {"mean": self.cfg.mean, "std": self.cfg.std}

    @property
    def model_cfg(self) -> ResNetConfig:
        return replace(self.cfg.model, num_classes=self.dataset.num_classes,
                       input_size=self.cfg.data.image_size)

    # -- artifacts ------------------------------------------------------------------------------
    def load_original(self) -> ResNet:
        state = torch.load(self.dir / "original.pt", map_location="cpu", weights_only=False)
        model = ResNet(ResNetConfig.from_dict(state["model_cfg"]))
        model.load_state_dict(state["state_dict"])
        return model.eval()

    def load_clusters(self) -> list[list[int]]:
        return json.loads((self.dir / "clusters.json").read_text())["clusters"]

    def load_trunk(self) -> Trunk:
        return build_trunk(self.load_original(), self.cfg.split_after)

    def feature_shape(self) -> tuple[int, ...]:
        s = self.cfg.data.image_size
        with torch.no_grad():
            return tuple(self.load_trunk()(torch.zeros(1, 3, s, s)).shape[1:])

    def load_clustifier(self) -> HeadNet:
        clusters = self.load_clusters()
        net = HeadNet(self.load_original(), self.cfg.split_after, self.cfg.clustifier, len(clusters),
                      groups=clusters)
        net.load_state_dict(torch.load(self.dir / "clustifier.pt", map_location="cpu"))
        return net.eval()

    def head_candidates(self) -> list[HeadChoice]:
        """Every trained head of the family for every cluster, with its calibration accuracy."""
        report = json.loads((self.dir / "heads.json").read_text())
        return [HeadChoice(**c) for c in report["candidates"]]

    def load_head(self, cluster: int, arch_name: str) -> HeadNet:
        arch = next(a for a in self.cfg.head_family if a.name == arch_name)
        members = self.load_clusters()[cluster]
        net = HeadNet(self.load_original(), self.cfg.split_after, arch, len(members), members)
        net.load_state_dict(torch.load(self.dir / "heads" / f"cluster{cluster}_{arch_name}.pt",
                                       map_location="cpu"))
        return net.eval()

    # -- stages ---------------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        marker = {
            "original": "original.pt", "similarity": "similarity.npz",
            "clustering": "clusters.json", "trunk": "trunk.json", "clustifier": "clustifier.pt",
            "heads": "heads.json", "confusion": "confusion.json",
        }[stage]
        return (self.dir / marker).exists()

    def run(self, stages: tuple[str, ...] = STAGES, force: bool = False) -> None:
        self.save_config()
        for stage in stages:
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
            if self.done(stage) and not force:
                logger.info("stage %-10s already done, skipping", stage)
                continue
            t0 = time.perf_counter()
            logger.info("stage %-10s starting", stage)
            if stage in TRAINED or ddp.is_main():  # under torchrun the others wait for rank 0
                getattr(self, f"stage_{stage}")()
            ddp.barrier()  # the stage's files are written before any process reads them
            logger.info("stage %-10s done in %.1f s", stage, time.perf_counter() - t0)

    def stage_original(self) -> None:
        """1. Train the original classifier: the baseline every saving is measured against.

        With ``original_init`` the run starts from a shipped narrower original, widened without
        changing its function, instead of from random weights (hours of CPU saved).
        """
        cfg = self.cfg
        checkpoint = self.dir / "original.ckpt.pt"
        model = ResNet(self.model_cfg)
        if cfg.original_init and not checkpoint.exists():
            start = self._original_start(Path(cfg.original_init))
            model = start if start.cfg.width == self.model_cfg.width else widen_resnet(
                start, self.model_cfg.width, seed=cfg.seed)
            logger.info("original starts from %s (width %d) at width %d", cfg.original_init,
                        start.cfg.width, self.model_cfg.width)
        images, labels = self.part("train")
        fit(model, lambda x, idx: (model(x), None), torch.from_numpy(images), labels, cfg.original,
            transform=image_transform(cfg.original, cfg.mean, cfg.std, cfg.data.image_size),
            checkpoint=checkpoint, seed=cfg.seed, desc="original")
        self._save_original(model)

    def _original_start(self, path: Path) -> ResNet:
        """The model ``original_init`` names: a package's ``original.onnx`` or a run's ``original.pt``.

        Either must have this config's layout at the same or a narrower width.
        """
        if path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=False)
            start = ResNet(ResNetConfig.from_dict(state["model_cfg"]))
            start.load_state_dict(state["state_dict"])
        elif path.suffix == ".onnx":
            start = self._imported(path, replace(self.model_cfg, width=onnx_stem_width(path)))
        else:
            raise ValueError(f"original_init = {str(path)!r}: give an exported original.onnx or a "
                             "run's original.pt")
        if replace(start.cfg, width=self.model_cfg.width) != self.model_cfg:
            raise ValueError(f"original_init {path} has layout {start.cfg.to_dict()}, which is not "
                             f"[model] {self.model_cfg.to_dict()} at the same or a narrower width")
        return start

    def _save_original(self, model: ResNet, **extra: str) -> None:
        """Stage 1's artifact: the model with its validation accuracy (trained or imported)."""
        if not ddp.is_main():
            return
        val_images, val_labels = self.part("val")
        logits = predict(model, val_images, desc="original val", **self.norm)
        acc = {"top1": topk_accuracy(logits, val_labels, 1), "top5": topk_accuracy(logits, val_labels, 5)}
        logger.info("original model: val top-1 %.4f, top-5 %.4f", acc["top1"], acc["top5"])
        torch.save({"model_cfg": model.cfg.to_dict(), "state_dict": model.state_dict(),
                    "val_accuracy": acc, **extra}, self.dir / "original.pt")

    def import_original(self, onnx_path: str | Path) -> None:
        """Stage 1 from a shipped ``original.onnx`` instead of training (hours on a CPU)."""
        model = self._imported(onnx_path, self.model_cfg)
        self.save_config()
        self._save_original(model, imported_from=str(onnx_path))

    def _imported(self, onnx_path: str | Path, model_cfg: ResNetConfig,
                  stat_images: int = 4096) -> ResNet:
        """A trainable ``ResNet(model_cfg)`` with the weights of ``onnx_path``.

        BN statistics are measured on ``stat_images`` training images; parity with ONNX Runtime
        is checked (a graph that does not match ``model_cfg`` is refused).
        """
        images, _ = self.part("train")
        rng = np.random.default_rng(self.cfg.seed)
        pick = np.sort(rng.choice(len(images), size=min(stat_images, len(images)), replace=False))
        batches = (to_tensor(torch.from_numpy(images[pick[i:i + 256]]), self.cfg.mean, self.cfg.std)
                   for i in range(0, len(pick), 256))
        model = import_original(onnx_path, model_cfg, batches)
        val_images, _ = self.part("val")
        probe = to_tensor(torch.from_numpy(val_images[:64]), self.cfg.mean, self.cfg.std)
        diff = ort_max_difference(model, onnx_path, [probe.numpy()])
        if diff > 1e-3:
            raise ValueError(f"imported model differs from {onnx_path} by {diff:.2e} in the logits; "
                             "the config's [model] does not describe this graph")
        logger.info("imported %s: max |Δlogit| vs ONNX Runtime %.1e", onnx_path, diff)
        return model

    def stage_similarity(self) -> None:
        """2. Class similarity from the original's softmax on the calibration split."""
        model = self.load_original()
        images, labels = self.part("calib")
        probs = torch.softmax(torch.from_numpy(
            predict(model, images, desc="similarity", **self.norm)), dim=1).numpy()
        sim = class_similarity(probs, labels, self.cfg.clustering.similarity)  # (C, C)
        np.savez(self.dir / "similarity.npz", similarity=sim, probs=probs, labels=labels)

    def stage_clustering(self) -> None:
        """3. Hyper-classes: Algorithm 2 (spectral + eigengap) or linkage with overlap."""
        cc = self.cfg.clustering
        data = np.load(self.dir / "similarity.npz")
        sim = data["similarity"]
        if cc.method == "spectral":
            result = spectral_clusters(sim, min_clusters=cc.min_clusters,
                                       max_clusters=cc.max_clusters, num_clusters=cc.num_clusters,
                                       seed=self.cfg.seed)
        elif cc.method == "linkage":
            if cc.num_clusters <= 0:
                raise ValueError("clustering.method = 'linkage' needs clustering.num_clusters > 0")
            cm = confusion_matrix(data["probs"].argmax(1), data["labels"], sim.shape[0])
            result = linkage_clusters(sim, cc.num_clusters, gamma=cc.gamma, confusion=cm)
        else:
            raise ValueError(f"clustering.method must be 'spectral' or 'linkage', got {cc.method!r}")
        names = self.dataset.class_names
        for i, members in enumerate(result.clusters):
            logger.info("cluster %d (%d classes): %s", i, len(members),
                        ", ".join(names[c] for c in members[:12]) + (" …" if len(members) > 12 else ""))
        _write_json(self.dir / "clusters.json", {
            "method": result.method, "k_neighbors": result.k_neighbors,
            "eigenvalues": result.eigenvalues, "clusters": result.clusters,
            "names": [[names[c] for c in members] for members in result.clusters],
        })
        from training.report import plot_cluster_sizes
        plot_cluster_sizes([len(m) for m in result.clusters], self.dir / "cluster_sizes.png")

    def stage_trunk(self) -> None:
        """4. The trunk: the original's stages up to ``split_after``, frozen (no training)."""
        model = self.load_original()
        trunk = build_trunk(model, self.cfg.split_after)
        s = self.cfg.data.image_size
        _write_json(self.dir / "trunk.json", {
            "split_after": self.cfg.split_after,
            "feature_shape": list(self.feature_shape()),
            "flops": module_flops(trunk, (3, s, s)),
            "original_flops": module_flops(model, (3, s, s)),
        })

    @property
    def feature_copies(self) -> int:
        """Copies of each training image in the feature cache: 2 with mirrored ones, else 1."""
        return 2 if self.cfg.feature_mirror else 1

    def train_features(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Trunk features and original-model logits of every training image (and its mirror).

        Stages 5 and 6 train many small networks on the frozen trunk; running the trunk and the
        distillation teacher once, instead of once per network and epoch, is what makes them
        affordable on a CPU. Cached in the run directory as float16 and memory-mapped (a layer1
        cut of a width-64 ResNet at 64 px is 128 KiB an image: 11 GB for Tiny-ImageNet, twice
        that with ``feature_mirror``). Computed in the heads' precision (bf16 autocast when set).
        Returns features (M·N, C', H', W'), teacher logits (M·N, C), labels (M·N,); M = 2 with
        mirrored copies, else 1.
        """
        cache = self.dir / "features"
        paths = {k: cache / f"train_{k}.npy" for k in ("features", "teacher", "labels")}
        flips = (False, True)[:self.feature_copies]
        if not all(p.exists() for p in paths.values()) and ddp.is_main():
            cache.mkdir(exist_ok=True)
            images, labels = self.part("train")
            model = self.load_original()
            precision = prec.resolve(self.cfg.head_optim.precision)
            prec.prepare(model, precision)
            trunk = build_trunk(model, self.cfg.split_after)
            tail = self._original_tail(model)
            n = len(images)
            shape = (len(flips) * n, *self.feature_shape())
            feats = np.lib.format.open_memmap(paths["features"].with_suffix(".tmp"), mode="w+",
                                              dtype=np.float16, shape=shape)
            teacher = np.zeros((len(flips) * n, self.dataset.num_classes), dtype=np.float16)
            for copy, flip in enumerate(flips):
                src = images[:, :, ::-1] if flip else images  # mirror: (N, H, W, 3)
                for start in tqdm(range(0, n, 256), desc=f"trunk features {'flipped' if flip else 'original'}"):
                    x = to_tensor(torch.from_numpy(np.ascontiguousarray(src[start:start + 256])),
                                  self.cfg.mean, self.cfg.std)
                    with torch.no_grad(), prec.autocast(precision):
                        f = trunk(prec.layout(x, precision))  # (B, C', H', W')
                        rows = slice(copy * n + start, copy * n + start + len(x))
                        feats[rows] = f.float().numpy().astype(np.float16)
                        teacher[rows] = tail(f).float().numpy().astype(np.float16)
            feats.flush()
            del feats
            paths["features"].with_suffix(".tmp").replace(paths["features"])
            np.save(paths["teacher"], teacher)
            np.save(paths["labels"], np.concatenate([labels] * len(flips)))
        ddp.barrier()  # under torchrun, rank 0 wrote the cache for every process
        # Copy-on-write map: pages come from the file on demand, nothing is written back.
        feats = torch.from_numpy(np.load(paths["features"], mmap_mode="c"))
        teacher_t = torch.from_numpy(np.load(paths["teacher"]))
        return feats, teacher_t, np.load(paths["labels"])

    def _original_tail(self, model: ResNet | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Original model from trunk features to logits (the distillation teacher)."""
        model = model or self.load_original()
        tail = nn.Sequential(*model.stages()[model.split_index(self.cfg.split_after):]).eval()
        return lambda f: model.forward_head(tail(f))

    def stage_clustifier(self) -> None:
        """5. Clustifier: trunk features → cluster, distilled from the original's cluster mass."""
        clusters = self.load_clusters()
        k = len(clusters)
        net = HeadNet(self.load_original(), self.cfg.split_after, self.cfg.clustifier, k,
                      groups=clusters)
        to_cluster = np.zeros(self.dataset.num_classes, dtype=np.int64)
        for i, members in enumerate(clusters):
            to_cluster[members] = i  # overlapping classes train on their last cluster
        feats, teacher_logits, labels = self.train_features()
        distill = self.cfg.clustifier_optim.distill > 0
        cluster_mass = ClusterPool(clusters, self.dataset.num_classes)

        def forward(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            # Teacher: log of the original model's probability mass on each cluster.
            t = cluster_mass(teacher_logits[idx].float()) if distill else None
            return net(x), t

        fit(net, forward, feats, to_cluster[labels], self.cfg.clustifier_optim,
            transform=feature_transform(self.cfg.clustifier_optim),
            checkpoint=self.dir / "clustifier.ckpt.pt", seed=self.cfg.seed + 1,
            desc="clustifier", epoch_size=len(feats) // self.feature_copies)
        if ddp.is_main():
            torch.save(net.state_dict(), self.dir / "clustifier.pt")

    def stage_heads(self) -> None:
        """6. One head per cluster and family member; export keeps the cheapest within tolerance."""
        clusters = self.load_clusters()
        (self.dir / "heads").mkdir(exist_ok=True)
        feats, teacher_logits, labels = self.train_features()
        cal_images, cal_labels = self.part("calib")
        feature_shape = self.feature_shape()
        original = self.load_original()
        cal_feats = torch.from_numpy(predict(self.load_trunk(), cal_images, desc="calib features",
                                             **self.norm))  # (N_cal, C', H', W')
        report: dict[str, list] = {"candidates": []}
        for ci, members in enumerate(clusters):
            local = {c: j for j, c in enumerate(members)}
            sel = np.isin(labels, members)
            cal_sel = np.isin(cal_labels, members)
            cal_y = np.array([local[c] for c in cal_labels[cal_sel]], dtype=np.int64)
            rows_np = np.nonzero(sel)[0]
            # Negatives: images of other clusters, label IGNORE (no cross-entropy), so a
            # head learns only the original's logits there: low ones for its classes. Without
            # them a head never sees a non-member and its logits off-cluster are arbitrary.
            n_neg = int(round(self.cfg.head_negatives * len(rows_np)))
            if n_neg:
                rng = np.random.default_rng(self.cfg.seed + 200 + ci)
                others = np.nonzero(~sel)[0]
                rows_np = np.sort(np.concatenate(
                    [rows_np, rng.choice(others, size=min(n_neg, len(others)), replace=False)]))
            y = np.array([local.get(int(c), IGNORE) for c in labels[rows_np]], dtype=np.int64)
            rows = torch.from_numpy(rows_np)
            head_feats = feats[rows]  # (n_c, C', H', W') float16
            head_teacher = teacher_logits[rows][:, members]  # (n_c, |cluster|)
            candidates = []
            for arch in self.cfg.head_family:
                path = self.dir / "heads" / f"cluster{ci}_{arch.name}.pt"
                net = HeadNet(original, self.cfg.split_after, arch, len(members), members)
                if path.exists():
                    net.load_state_dict(torch.load(path, map_location="cpu"))
                else:
                    def forward(x: torch.Tensor, idx: torch.Tensor, net: nn.Module = net,
                                t: torch.Tensor = head_teacher) -> tuple[torch.Tensor, torch.Tensor]:
                        return net(x), t[idx].float()

                    fit(net, forward, head_feats, y, self.cfg.head_optim,
                        transform=feature_transform(self.cfg.head_optim),
                        checkpoint=path.with_suffix(".ckpt.pt"),
                        seed=self.cfg.seed + 100 + ci, desc=f"head c{ci} {arch.name}",
                        epoch_size=len(head_feats) // self.feature_copies)
                    if ddp.is_main():
                        torch.save(net.state_dict(), path)
                net.eval()
                with torch.no_grad():
                    logits = torch.cat([net(chunk) for chunk in cal_feats[cal_sel].split(256)])
                acc = topk_accuracy(logits.numpy(), cal_y, 1)
                flops = module_flops(net, feature_shape)
                candidates.append(HeadChoice(ci, arch.name, acc, flops))
                logger.info("cluster %d head %-12s calib acc %.4f, %.2f MFLOPs", ci, arch.name,
                            acc, flops / 1e6)
            report["candidates"] += [c.__dict__ for c in candidates]
        if ddp.is_main():  # export times them and picks one per cluster
            _write_json(self.dir / "heads.json", report)

    def stage_confusion(self) -> None:
        """7. Clustifier confusion matrix on the calibration split (never on training data)."""
        clusters = self.load_clusters()
        net, trunk = self.load_clustifier(), self.load_trunk()
        to_cluster = np.zeros(self.dataset.num_classes, dtype=np.int64)
        for i, members in enumerate(clusters):
            to_cluster[members] = i
        out = {}
        for part in ("calib", "val"):
            images, labels = self.part(part)
            logits = predict(lambda x: net(trunk(x)), images, desc=f"clustifier {part}", **self.norm)
            truth = to_cluster[labels]
            # With overlap, a prediction is right when the class is a member of the predicted cluster.
            pred = logits.argmax(1)
            right = np.array([labels[i] in clusters[p] for i, p in enumerate(pred)])
            out[part] = {"accuracy": float(right.mean()),
                         "confusion": confusion_matrix(pred, truth, len(clusters)).tolist()}
        logger.info("clustifier accuracy: calib %.4f, val %.4f", out["calib"]["accuracy"],
                    out["val"]["accuracy"])
        _write_json(self.dir / "confusion.json", out)

    def artifacts(self) -> RunArtifacts:
        """The trained parts for export; every stage must have run (``python -m training run``)."""
        missing = [stage for stage in STAGES if not self.done(stage)]
        if missing:
            raise FileNotFoundError(
                f"{self.dir} has not finished training (stages {', '.join(missing)} not done): "
                f"run `python -m training run --config …` with run_dir = {str(self.dir)!r} first")
        confusion = json.loads((self.dir / "confusion.json").read_text())
        state = torch.load(self.dir / "original.pt", map_location="cpu", weights_only=False)
        plot = self.dir / "cluster_sizes.png"
        return RunArtifacts(
            config=self.cfg, dataset_name=self.dataset.name, class_ids=self.dataset.class_ids,
            class_names=self.dataset.class_names,
            split_sizes=SplitSizes(len(self.splits.train), len(self.splits.calib),
                                   len(self.splits.val)),
            clusters=self.load_clusters(), original=self.load_original(), trunk=self.load_trunk(),
            clustifier=self.load_clustifier(), head_candidates=self.head_candidates(),
            load_head=self.load_head, original_accuracy=state["val_accuracy"],
            clustifier_accuracy=confusion["val"]["accuracy"],
            clustifier_confusion=confusion["calib"]["confusion"],
            cluster_plot=plot if plot.exists() else None, images=self.part)
