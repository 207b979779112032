"""Image preprocessing shared by training and serving.

Training decodes its datasets with these functions and the server decodes requests with
them, so a model sees pixels prepared the same way in both places. No torch here: the
serving install does not have it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["resize_center_crop", "to_rgb"]

# Modes whose samples are wider than 8 bits; Pillow's own convert() clips them at 255,
# which turns almost every 16-bit image white, so they are rescaled explicitly.
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Return `img` as 8-bit RGB.

    Alpha is composited on white (a transparent PNG shows its visible content, not the
    arbitrary colour stored under alpha 0); palette, greyscale and CMYK images are
    converted; 16-bit greyscale is scaled down by 256 rather than clipped; float images
    are clipped to [0, 255] as Pillow does.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_INT_MODES:
        wide = np.asarray(img).astype(np.int64)
        grey = np.clip(wide >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        grey = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = img.mode in _ALPHA_MODES or (img.mode in {"P", "L"} and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, *,
                       max_resized_pixels: int | None = None) -> Image.Image:
    """Scale the shorter side to `size` (bilinear) and cut the central `size` x `size` square.

    Keeps the aspect ratio, so objects are not squashed; an image already `size` square is
    returned unchanged (no resampling blur).

    `max_resized_pixels` (the server sets it; training does not): when the scaled image would
    be larger than this, e.g. a 10000 x 1 strip scaled up to 640000 x 64, only the square that
    the crop keeps is resampled (Pillow's `resize(box=...)`, the same sampling positions), so a
    tiny upload cannot cost gigabytes. Pixels may then differ by 1 from the full resize.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if max_resized_pixels is not None and new_w * new_h > max_resized_pixels:
        sx, sy = w / new_w, h / new_h  # source pixels per scaled pixel
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return img.crop((left, top, left + size, top + size))
