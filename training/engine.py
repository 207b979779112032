"""The optimisation loop every trainable stage shares: batches, augmentation, SGD one-cycle,
optional distillation, a checkpoint per epoch and resume from it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from training import distributed as ddp
from training import precision as prec
from training.config import OptimConfig
from training.data import augment_batch, random_resized_crop, to_tensor

logger = logging.getLogger(__name__)

# (input batch after transform, batch indices) -> (student logits, teacher logits or None)
Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
# (raw input batch, generator, epoch) -> model input
Transform = Callable[[torch.Tensor, torch.Generator, int], torch.Tensor]


def image_transform(cfg: OptimConfig, mean: Sequence[float], std: Sequence[float],
                    image_size: int) -> Transform:
    """uint8 (B, H, W, 3) → augmented, normalised (B, 3, H, W), resized per ``cfg.progressive``."""
    pad = max(1, round(image_size / 8))
    scaled = cfg.augment and cfg.min_area < 1

    def transform(batch: torch.Tensor, gen: torch.Generator, epoch: int) -> torch.Tensor:
        if cfg.augment and not scaled:
            batch = augment_batch(batch, pad=pad, generator=gen)
        x = to_tensor(batch, mean, std)  # (B, 3, H, W) float32
        side = cfg.progressive[epoch] if epoch < len(cfg.progressive) else x.shape[-1]
        if scaled:  # the crop is resampled straight to this epoch's side
            return random_resized_crop(x, min_area=cfg.min_area, size=side, generator=gen)
        if side != x.shape[-1]:  # progressive resizing: cheap early epochs
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                              align_corners=False)  # (B, 3, side, side)
        return x

    return transform


def feature_transform(cfg: OptimConfig) -> Transform:
    """Cached trunk features (B, C, H, W) → float32, randomly shifted by up to one cell.

    A one-cell shift of a stride-s feature map stands in for an s-pixel random crop of the image;
    horizontal flips come from the flipped copies in the cache, when it has them.
    """

    def transform(batch: torch.Tensor, gen: torch.Generator, epoch: int) -> torch.Tensor:
        x = batch.float()
        if cfg.augment:
            x = augment_batch(x.permute(0, 2, 3, 1), pad=1, flip=False, generator=gen)
            x = x.permute(0, 3, 1, 2)
        return x.contiguous()

    return transform


IGNORE = -100  # label of a sample with no class among the outputs (trained by distillation only)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
            cfg: OptimConfig) -> torch.Tensor:
    """(1 − α)·CE(label-smoothed) + α·T²·KL(teacher_T ‖ student_T) + β·MSE(student, teacher).

    α = cfg.distill, β = cfg.logit_match; labels equal to ``IGNORE`` get no cross-entropy. KL only
    matches each head's softmax, which is blind to a shift of all its logits; the MSE term pins the
    logits themselves to the original's, so the logits of different heads stay comparable (what a
    joint softmax over heads needs).
    """
    labelled = labels != IGNORE
    # Samples labelled IGNORE (a head's negatives) only learn from the teacher.
    ce = F.cross_entropy(logits[labelled], labels[labelled], label_smoothing=cfg.label_smoothing) \
        if bool(labelled.any()) else logits.sum() * 0.0
    if teacher is None:
        return ce
    loss = ce
    if cfg.distill > 0:
        t = cfg.temperature
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                      reduction="batchmean", log_target=True) * t * t
        loss = (1 - cfg.distill) * ce + cfg.distill * kd
    if cfg.logit_match > 0:
        loss = loss + cfg.logit_match * F.mse_loss(logits, teacher)
    return loss


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def fit(
    module: nn.Module,
    forward: Forward,
    inputs: torch.Tensor,
    labels: np.ndarray,
    cfg: OptimConfig,
    *,
    transform: Transform,
    checkpoint: Path,
    seed: int,
    desc: str,
    frozen: Sequence[nn.Module] = (),
    epoch_size: int = 0,
) -> nn.Module:
    """Train ``module`` (whose parameters ``forward`` uses) on ``inputs`` (N, ...) and ``labels``.

    Each epoch draws ``epoch_size`` samples (default all N) in a seeded random order, so a resumed
    run sees the same batches. Resumes from ``checkpoint`` when it exists; writes it after every
    epoch. ``frozen`` modules stay in eval mode (a frozen trunk's BatchNorm must not move).
    ``cfg.precision`` = "bf16" runs ``forward`` under bf16 autocast on channels_last tensors; the
    weights, the optimizer and the loss stay fp32, and ``module`` is handed back contiguous.
    Under ``torchrun`` each process takes its share of every global batch and gradients are
    averaged before each step (``training.distributed``); only rank 0 writes the checkpoint.
    """
    precision = prec.resolve(cfg.precision)
    for m in (module, *frozen):
        prec.prepare(m, precision)
    n = len(inputs)
    per_epoch = epoch_size or n
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.SGD(_param_groups(module, cfg.weight_decay), lr=cfg.lr, momentum=0.9,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1),
                                                pct_start=0.15, div_factor=10, final_div_factor=100)
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["epoch"]
        logger.info("%s: resuming from %s at epoch %d/%d", desc, checkpoint, start, cfg.epochs)
    ddp.broadcast_module(module)  # every process starts from rank 0's weights
    world = ddp.world_size()
    all_labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    for epoch in range(start, cfg.epochs):
        module.train()
        for m in frozen:
            m.eval()
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)  # resumable, reproducible order
        order = torch.randperm(n, generator=gen)[:per_epoch]
        seen, seen_labelled, correct, loss_sum = 0, 0, 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not ddp.is_main() or None)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = transform(inputs[idx], gen, epoch)
            if world > 1:  # the transform drew for the whole global batch (every process's
                mine = ddp.shard(torch.arange(len(idx)))  # generator stays in step); keep a share
                idx, x = idx[mine], x[mine]
            x = prec.layout(x, precision)
            y = all_labels[idx]
            opt.zero_grad(set_to_none=True)
            if len(idx):
                with prec.autocast(precision):
                    logits, teacher = forward(x, idx)
                logits = logits.float()  # the loss in fp32 whatever the forward ran in
                teacher = None if teacher is None else teacher.float()
                loss = loss_fn(logits, y, teacher, cfg)
                loss.backward()
                labelled = y != IGNORE
                seen += len(y)
                seen_labelled += int(labelled.sum())
                correct += int(((logits.argmax(1) == y) & labelled).sum())
                loss_sum += float(loss.detach()) * len(y)
            ddp.average_gradients(module.parameters())
            opt.step()
            sched.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}",
                                acc=f"{correct / max(seen_labelled, 1):.3f}")
        ddp.average_buffers(module)  # one set of BatchNorm statistics for every process
        seen, seen_labelled, correct, loss_sum = ddp.total(seen, seen_labelled, correct, loss_sum)
        logger.info("%s epoch %d/%d (%s): loss %.4f, train acc %.4f", desc, epoch + 1, cfg.epochs,
                    precision, loss_sum / max(seen, 1), correct / max(seen_labelled, 1))
        if ddp.is_main():
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": module.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "epoch": epoch + 1}, tmp)
            tmp.replace(checkpoint)  # atomic: a kill mid-write never corrupts the checkpoint
        ddp.barrier()
    for m in (module, *frozen):
        prec.prepare(m, "fp32")  # evaluation and export see ordinary contiguous weights
    module.eval()
    return module


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, *,
            mean: Sequence[float], std: Sequence[float], batch_size: int = 256,
            desc: str = "predict") -> np.ndarray:
    """Run ``fn`` (in eval mode, no augmentation) over uint8 images; returns stacked outputs."""
    outs = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        x = to_tensor(torch.from_numpy(images[start:start + batch_size]), mean, std)
        outs.append(fn(x).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,))


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1))) if len(labels) else 0.0
