"""Mask helpers: normalising, growing, feathering, and drawing shapes (rectangle, ellipse, grid cell).

MASK values are float tensors (B, H, W) in [0, 1] on CPU; 1 marks the area to change.
Used by the mask nodes and by the editing loops (app/models/editing.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import ImageColor


def as_mask(mask: torch.Tensor) -> torch.Tensor:
    """Any (H, W), (B, H, W) or (B, 1, H, W) mask -> (B, H, W) float32 in [0, 1]."""
    m = mask.float()
    if m.dim() == 2:
        m = m[None]
    elif m.dim() == 4:
        if m.shape[1] != 1:
            raise ValueError(f"expected a single-channel mask, got shape {tuple(mask.shape)}")
        m = m[:, 0]
    elif m.dim() != 3:
        raise ValueError(f"expected a mask (B, H, W), got shape {tuple(mask.shape)}")
    return m.clamp(0, 1)


def grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (pixels > 0) or erode (pixels < 0) by a disc of radius |pixels| (soft values kept)."""
    m = as_mask(mask)
    if pixels == 0:
        return m
    r = abs(int(pixels))
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disc = (xx * xx + yy * yy) <= r * r + r  # a slightly rounded disc: radius 1 gives the 3x3 cross + corners
    offsets = [(int(dy), int(dx)) for dy, dx in zip(yy[disc], xx[disc], strict=True)]
    src = m if pixels > 0 else 1 - m
    padded = F.pad(src[:, None], (r, r, r, r), mode="constant", value=0.0)[:, 0]
    h, w = m.shape[-2:]
    out = torch.zeros_like(src)
    for dy, dx in offsets:
        out = torch.maximum(out, padded[:, r + dy: r + dy + h, r + dx: r + dx + w])
    return out if pixels > 0 else 1 - out


def blur(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur with standard deviation radius/2 (kernel spans ±radius), edges replicated."""
    m = as_mask(mask)
    if radius <= 0:
        return m
    sigma = max(radius / 2.0, 1e-3)
    half = max(1, math.ceil(radius))
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    t = m[:, None]
    t = F.pad(t, (half, half, half, half), mode="replicate")
    t = F.conv2d(t, kernel.view(1, 1, 1, -1))
    t = F.conv2d(t, kernel.view(1, 1, -1, 1))
    return t[:, 0].clamp(0, 1)


def _pixel_centres(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    return ys, xs


def rectangle(h: int, w: int, x: float, y: float, rw: float, rh: float) -> torch.Tensor:
    """(H, W) area coverage of the rectangle [x, x+rw) x [y, y+rh) (anti-aliased edges)."""
    ys, xs = _pixel_centres(h, w)
    cover_x = ((xs + 0.5).clamp(max=x + rw) - (xs - 0.5).clamp(min=x)).clamp(0, 1)
    cover_y = ((ys + 0.5).clamp(max=y + rh) - (ys - 0.5).clamp(min=y)).clamp(0, 1)
    return (cover_x * cover_y).expand(h, w).clone()


def ellipse(h: int, w: int, x: float, y: float, rw: float, rh: float) -> torch.Tensor:
    """(H, W) ellipse inscribed in the box (x, y, rw, rh), anti-aliased by its approximate signed distance."""
    ys, xs = _pixel_centres(h, w)
    a, b = max(rw / 2, 1e-3), max(rh / 2, 1e-3)
    cx, cy = x + a, y + b
    u, v = (xs - cx) / a, (ys - cy) / b
    k = torch.sqrt(u * u + v * v)
    # distance of the level set k = 1, scaled by the gradient norm (first-order signed distance)
    grad = torch.sqrt((u / a) ** 2 + (v / b) ** 2).clamp(min=1e-6) / k.clamp(min=1e-6)
    d = (k - 1) / grad
    return (0.5 - d).clamp(0, 1)


def grid_cell(h: int, w: int, index: int, rows: int = 3, columns: int = 3) -> torch.Tensor:
    """(H, W) 1 on the pixels whose centre lies in cell ``index`` (row-major) of a rows x columns grid."""
    r, c = divmod(index, columns)
    ys, xs = _pixel_centres(h, w)
    in_y = (ys >= r * h / rows) & (ys < (r + 1) * h / rows)
    in_x = (xs >= c * w / columns) & (xs < (c + 1) * w / columns)
    return (in_y & in_x).float()


def parse_colour(text: str) -> tuple[int, int, int]:
    """'#rrggbb', 'rgb(…)', a CSS name, or 'r,g,b' -> an RGB triple."""
    value = text.strip()
    if value.count(",") == 2 and not value.startswith("rgb"):
        parts = [int(float(p)) for p in value.split(",")]
        return tuple(max(0, min(255, p)) for p in parts)  # type: ignore[return-value]
    try:
        rgb = ImageColor.getrgb(value)
    except ValueError:
        raise ValueError(f"cannot read colour {text!r}: use #rrggbb, r,g,b or a colour name") from None
    return rgb[:3]
