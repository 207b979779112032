"""Batch augmentation and the float conversion shared with serving, in torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in [-(n-1), 2n-2] into [0, n-1] by reflection without repeating the edge."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def augment_batch(
    images: torch.Tensor,
    *,
    pad: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop from a reflect-padded image plus random horizontal flip.

    (B, H, W, C) uint8 -> (B, H, W, C) uint8 on the same device. Padding, cropping and
    flipping are one gather of reflected row/column indices, so nothing is padded in
    memory and there is no per-image Python loop. `pad` must be smaller than H and W.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got {tuple(images.shape)}")
    b, h, w, _ = images.shape
    if pad < 0 or pad >= min(h, w):
        raise ValueError(f"pad must be in [0, {min(h, w) - 1}] for {h}x{w} images, got {pad}")
    if b == 0 or (pad == 0 and not flip):
        return images
    dev = images.device
    # draw on the generator's device (a CUDA generator cannot fill a CPU tensor), then move
    rand_dev = generator.device if generator is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=rand_dev).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=rand_dev).to(dev)
    rows = _reflect(torch.arange(h, device=dev) + dy - pad, h)  # (B, H)
    cols = _reflect(torch.arange(w, device=dev) + dx - pad, w)  # (B, W)
    if flip:
        flips = torch.rand((b, 1), generator=generator, device=rand_dev).to(dev) < 0.5
        cols = torch.where(flips, cols.flip(1), cols)
    # one index_select over all pixels is ~3x faster on CPU than 3-tensor advanced indexing
    batch = torch.arange(b, device=dev)[:, None, None]
    pixel = (batch * h + rows[:, :, None]) * w + cols[:, None, :]  # (B, H, W) flat pixel index
    flat = images.reshape(b * h * w, -1)  # (B*H*W, C)
    return flat.index_select(0, pixel.reshape(-1)).view(images.shape)  # (B, H, W, C)


def to_tensor(
    images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 (x/255 - mean)/std.

    The server normalises the same way, in the same float32 operation order, so a model
    sees identical inputs in training and serving.
    """
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (B, 3, H, W)
    return ((x - m) / s).contiguous()
