"""Batch augmentation and the float conversion shared with serving, in torch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


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


def random_resized_crop(
    x: torch.Tensor,
    *,
    min_area: float,
    size: int | None = None,
    flip: bool = True,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scale augmentation: a random box of each image, resampled to ``size`` (default: its side).

    (B, C, H, W) float -> (B, C, size, size). The box covers an area fraction drawn uniformly from
    [min_area, 1] with an aspect ratio log-uniform in ``ratio`` (clipped to the image) at a uniform
    position, mirrored with probability 1/2 when ``flip``: the Inception crop, drawn for the whole
    batch at once and applied by one ``grid_sample`` (bilinear), so there is no per-image loop.
    With ``min_area`` = 1 and no flip it returns the input unchanged.
    """
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(x.shape)}")
    if not 0 < min_area <= 1:
        raise ValueError(f"min_area must be in (0, 1], got {min_area}")
    b, _, h, w = x.shape
    size = size or h
    if b == 0 or (min_area == 1 and not flip and size == h == w):
        return x
    rand_dev = generator.device if generator is not None else torch.device("cpu")

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, device=rand_dev)

    area = uniform(min_area, 1.0)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    bw = torch.sqrt(area * aspect).clamp(max=1.0)  # box width / image width
    bh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - bw) * uniform(-1.0, 1.0)  # box centre in grid coordinates [-1, 1]
    cy = (1 - bh) * uniform(-1.0, 1.0)
    sx = torch.where(uniform(0.0, 1.0) < 0.5, -bw, bw) if flip else bw
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = bh, cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


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
