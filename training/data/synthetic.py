"""A procedurally generated dataset with a planted two-level class hierarchy.

S super-classes x M classes each. A super-class is easy to recognise: its own hue and its
own stripe orientation. Classes within a super-class differ only by weak cues that a CNN
can use anywhere in the image (a small hue shift and a small change of stripe frequency),
and every image jitters those cues, so neighbouring classes overlap: even a perfect
classifier confuses them. A model trained on it therefore confuses classes within a
super-class far more than across, and clustering its confusions should recover the plant.
The cues are translation- and flip-invariant, so random-crop/flip augmentation keeps them.
"""

from __future__ import annotations

import numpy as np

from training.data.imageset import ImageSet

_BASE_CYCLES = 3.0  # stripe frequency of class 0, in cycles per image width
_CYCLES_STEP = 0.6  # frequency gap between neighbouring classes of a super-class
_HUE_STEP_FRACTION = 0.12  # hue gap between neighbouring classes / hue gap between super-classes
_PIXEL_NOISE = 0.06  # per-pixel Gaussian noise std, on a 0..1 intensity scale


def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    """(N,) hues in [0, 1) -> (N, 3) RGB in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def make_synthetic(
    *,
    superclasses: int,
    classes_per_super: int,
    per_class: int,
    image_size: int,
    noise: float,
    seed: int,
) -> ImageSet:
    """Generate the dataset.

    `noise` is the per-image jitter (std) of the class cues relative to the gap between
    neighbouring classes: higher makes classes within a super-class harder to tell apart.
    At 0.75 a small CNN gets ~65-75% of within-super-class decisions right and ~100% of
    super-class decisions.
    """
    if min(superclasses, classes_per_super, per_class, image_size) <= 0:
        raise ValueError("synthetic dataset sizes must be positive")
    rng = np.random.default_rng(seed)
    S, M, H = superclasses, classes_per_super, image_size
    labels = np.repeat(np.arange(S * M, dtype=np.int64), per_class)  # (N,)
    n = len(labels)
    sup, cls = labels // M, labels % M
    centred = cls - (M - 1) / 2  # class position within its super-class, centred on 0

    # 1. colour: super-class hue, plus a class shift of a fraction of the gap, jittered per image
    hue_step = _HUE_STEP_FRACTION / S
    hue = (sup / S + (centred + noise * rng.standard_normal(n)) * hue_step) % 1.0
    colour = _hsv_to_rgb(hue, 0.65, 0.85) * rng.uniform(0.85, 1.15, (n, 1))  # (N, 3)

    # 2. stripes: super-class orientation, class frequency (jittered), random phase
    theta = np.pi * sup / S + rng.normal(0.0, 0.05, n)
    cycles = _BASE_CYCLES + (cls + noise * rng.standard_normal(n)) * _CYCLES_STEP
    phase = rng.uniform(0.0, 2 * np.pi, n)
    coords = 2 * np.pi * np.arange(H, dtype=np.float32) / H
    fx = (cycles * np.cos(theta)).astype(np.float32)[:, None, None]
    fy = (cycles * np.sin(theta)).astype(np.float32)[:, None, None]
    arg = (
        fx * coords[None, None, :]
        + fy * coords[None, :, None]
        + phase.astype(np.float32)[:, None, None]
    )
    stripes = 0.55 + 0.225 * (1.0 + np.sin(arg))  # (N, H, W) in [0.55, 1]

    # 3. compose, add pixel noise, quantise
    img = colour.astype(np.float32)[:, None, None, :] * stripes[..., None]  # (N, H, W, 3)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(_PIXEL_NOISE)
    images = np.clip(np.rint(img * np.float32(255.0)), 0, 255).astype(np.uint8)

    ids = [f"s{s}c{c}" for s in range(S) for c in range(M)]
    names = [f"super{s}-class{c}" for s in range(S) for c in range(M)]
    return ImageSet(images, labels, ids, names, f"synthetic-{S}x{M}")
