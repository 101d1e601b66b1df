"""Image helpers: resizing (with a centre crop), target sizes (by side, by aspect ratio and
megapixels, nearest preferred size) and stitching two images side by side.

IMAGE values are float tensors (B, H, W, C) in [0, 1]. Used by the image nodes (nodes/comfy_compat.py),
which give imported ComfyUI workflows the capabilities of ComfyUI's utility nodes of the same names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METHODS = ["nearest-exact", "bilinear", "bicubic"]
SPACING_COLOURS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
                   "blue": (0.0, 0.0, 1.0)}


def resize(image: torch.Tensor, method: str, width: int, height: int, crop: str = "disabled") -> torch.Tensor:
    """``image`` resized to width x height (antialiased unless nearest); ``crop="center"`` first
    crops the centre to the target aspect ratio instead of stretching."""
    pixels = image.movedim(-1, 1)
    if crop == "center":
        old_h, old_w = pixels.shape[-2:]
        keep_w, keep_h = min(old_w, round(old_h * width / height)), min(old_h, round(old_w * height / width))
        left, top = (old_w - keep_w) // 2, (old_h - keep_h) // 2
        pixels = pixels[..., top:top + keep_h, left:left + keep_w]
    resized = F.interpolate(pixels, size=[height, width], mode=method,
                            **({} if method == "nearest-exact" else {"antialias": True}))
    return resized.movedim(1, -1).clamp(0, 1)


def side_size(height: int, width: int, side: str, size: int) -> tuple[int, int]:
    """(height, width) with the longer (or shorter) side ``size``, keeping the aspect ratio."""
    longer = height >= width if side == "longer" else height <= width
    if height == width:
        return size, size
    if longer:
        return size, max(1, round(width * size / height))
    return max(1, round(height * size / width)), size


def nearest_size(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) of ``sizes`` whose aspect ratio is closest to width / height."""
    ratio = width / height
    return min(sizes, key=lambda size: abs(ratio - size[0] / size[1]))


def aspect_size(ratio_w: int, ratio_h: int, megapixels: float, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of about ``megapixels`` x 1024² pixels at ratio_w:ratio_h, each a multiple of ``multiple``."""
    scale = math.sqrt(megapixels * 1024 * 1024 / (ratio_w * ratio_h))
    return (max(multiple, round(ratio_w * scale / multiple) * multiple),
            max(multiple, round(ratio_h * scale / multiple) * multiple))


def _match_batch(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both batches as long as the longer one, the shorter repeating its last image."""
    count = max(first.shape[0], second.shape[0])
    grow = lambda t: torch.cat([t, t[-1:].expand(count - t.shape[0], *t.shape[1:])]) if t.shape[0] < count else t  # noqa: E731
    return grow(first), grow(second)


def _pad_centre(image: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    pad = [0, 0] * (image.dim() - 1 - dim) + [missing // 2, missing - missing // 2]  # F.pad counts from the last dim
    return F.pad(image, pad, value=value)


def stitch(image1: torch.Tensor, image2: torch.Tensor, direction: str = "right", match_size: bool = True,
           spacing: int = 0, colour: str = "white") -> torch.Tensor:
    """``image2`` placed right/down/left/up of ``image1``. ``match_size``: image2 is resized to image1's
    height (left/right) or width (up/down), keeping its aspect ratio; else the smaller one is padded
    (centred) with the spacing colour (black for coloured spacing). ``spacing`` pixels (rounded up to
    even) of ``colour`` go between them. A missing channel (alpha) is filled with 1."""
    image1, image2 = _match_batch(image1, image2)
    across = direction in ("left", "right")
    dim = 1 if across else 2  # the dimension that must agree (height for left/right)
    if match_size:
        h1, w1 = image1.shape[1:3]
        h2, w2 = image2.shape[1:3]
        size = (h1, int(h1 * w2 / h2)) if across else (int(w1 * h2 / w2), w1)
        image2 = resize(image2, "bicubic", size[1], size[0])
    else:
        fill = SPACING_COLOURS[colour][0] if colour in ("white", "black") else 0.0
        target = max(image1.shape[dim], image2.shape[dim])
        image1, image2 = (_pad_centre(t, dim, target, fill) for t in (image1, image2))
    channels = max(image1.shape[-1], image2.shape[-1])
    image1, image2 = (torch.cat([t, torch.ones(*t.shape[:-1], channels - t.shape[-1])], -1) for t in (image1, image2))
    parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
    if spacing > 0:
        spacing += spacing % 2
        shape = [image1.shape[0], image1.shape[1], spacing] if across else [image1.shape[0], spacing, image1.shape[2]]
        gap = torch.zeros(*shape, channels)
        rgb = SPACING_COLOURS[colour]
        gap[..., :min(3, channels)] = torch.tensor(rgb[:min(3, channels)])
        if channels == 4:
            gap[..., 3] = 1.0
        parts.insert(1, gap)
    return torch.cat(parts, dim=2 if across else 1)
