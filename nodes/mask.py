"""Mask tools: masks from images (alpha, colour, channel), shapes drawn without a canvas
(rectangle, ellipse, 3x3 grid cell), and mask operations (invert, grow/shrink, blur, combine).

MASK values are float tensors (B, H, W) in [0, 1] on CPU; 1 marks the area to change
(the convention of LoadImage and the inpainting nodes).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from app.core import paths
from app.core import vocabulary as vocab
from app.core.images import open_image
from app.core.registry import Link, node
from app.core.types import IMAGE, MASK, Spec
from app.models.masks import as_mask, blur, ellipse, grid_cell, grow, parse_colour, rectangle

GRID_POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
CHANNELS = ["alpha", "red", "green", "blue", "luminance"]


# ---------------------------------------------------------------------------------------------
# masks from images


@node(category="mask", outputs={"mask": MASK})
def MaskFromColor(
    image: IMAGE,
    color: Annotated[str, Spec(tooltip="#rrggbb, r,g,b or a colour name.")] = "#ffffff",
    tolerance: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Largest per-channel difference (0..1) still counted as the colour.")] = 0.1,
) -> torch.Tensor:
    """Mask of the pixels close to one colour (e.g. an object of a known colour)."""
    rgb = torch.tensor(parse_colour(color), dtype=torch.float32) / 255.0
    diff = (image[..., :3].float() - rgb).abs().amax(-1)
    return (diff <= tolerance + 1e-6).float()


@node(category="mask", outputs={"mask": MASK})
def MaskFromImage(
    image: IMAGE,
    channel: Annotated[str, Spec(choices=["luminance", "red", "green", "blue"])] = "luminance",
) -> torch.Tensor:
    """A mask from one channel of an image (or its luminance): white = 1."""
    img = image.float()
    if channel == "luminance":
        return (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]).clamp(0, 1)
    return img[..., ["red", "green", "blue"].index(channel)].clamp(0, 1)


@node(category="mask", outputs={"mask": MASK})
def LoadImageMask(
    image: Annotated[str, Spec(file="input", choices=lambda: paths.list_files("input", (".png", ".webp", ".jpg", ".jpeg", ".bmp", ".gif"), folders=False),
                               tooltip="An image in the input folder.")],
    channel: Annotated[str, Spec(choices=CHANNELS, tooltip="alpha: 1 where transparent (the area to fill).")] = "alpha",
) -> torch.Tensor:
    """Load a mask from an image file: its alpha channel (transparent = 1) or a colour channel."""
    rgba = np.asarray(open_image(image).convert("RGBA")).astype(np.float32) / 255.0  # bombs refused first
    array = torch.from_numpy(rgba.copy())
    if channel == "alpha":
        return (1.0 - array[..., 3])[None]
    if channel == "luminance":
        return (0.299 * array[..., 0] + 0.587 * array[..., 1] + 0.114 * array[..., 2])[None]
    return array[..., ["red", "green", "blue"].index(channel)][None]


@node(category="mask", outputs={"image": IMAGE})
def MaskToImage(mask: MASK) -> torch.Tensor:
    """Show a mask as a greyscale image (white = 1)."""
    return as_mask(mask)[..., None].expand(-1, -1, -1, 3).clone()


# ---------------------------------------------------------------------------------------------
# shapes


def _size(image: torch.Tensor | None, width: int, height: int) -> tuple[int, int, int]:
    if image is not None:
        return image.shape[0], image.shape[1], image.shape[2]
    return 1, height, width


_SIZE_LINK = Link(IMAGE, "Take the width and height (and batch) from this image instead.", optional=True)


@node(category="mask/shapes", outputs={"mask": MASK})
def SolidMask(
    value: Annotated[float, Spec(min=0.0, max=1.0, step=0.01)] = 1.0,
    width: Annotated[int, Spec(min=1, max=16384)] = 128,
    height: Annotated[int, Spec(min=1, max=16384)] = 128,
    like: _SIZE_LINK = None,
) -> torch.Tensor:
    """A mask of one value everywhere."""
    b, h, w = _size(like, width, height)
    return torch.full((b, h, w), float(value))


@node(category="mask/shapes", outputs={"mask": MASK})
def RectangleMask(
    x: Annotated[int, Spec(min=-16384, max=16384, tooltip="Left edge in pixels.")] = 0,
    y: Annotated[int, Spec(min=-16384, max=16384, tooltip="Top edge in pixels.")] = 0,
    box_width: Annotated[int, Spec(min=0, max=16384)] = 64,
    box_height: Annotated[int, Spec(min=0, max=16384)] = 64,
    width: Annotated[int, Spec(min=1, max=16384, tooltip="Mask width (ignored when 'like' is linked).")] = 128,
    height: Annotated[int, Spec(min=1, max=16384)] = 128,
    like: _SIZE_LINK = None,
) -> torch.Tensor:
    """A rectangle (1 inside), given by its top-left corner and size in pixels."""
    b, h, w = _size(like, width, height)
    return rectangle(h, w, x, y, box_width, box_height)[None].expand(b, h, w).clone()


@node(category="mask/shapes", outputs={"mask": MASK})
def EllipseMask(
    x: Annotated[int, Spec(min=-16384, max=16384, tooltip="Left edge of the bounding box in pixels.")] = 32,
    y: Annotated[int, Spec(min=-16384, max=16384, tooltip="Top edge of the bounding box in pixels.")] = 32,
    box_width: Annotated[int, Spec(min=0, max=16384)] = 64,
    box_height: Annotated[int, Spec(min=0, max=16384)] = 64,
    width: Annotated[int, Spec(min=1, max=16384, tooltip="Mask width (ignored when 'like' is linked).")] = 128,
    height: Annotated[int, Spec(min=1, max=16384)] = 128,
    like: _SIZE_LINK = None,
) -> torch.Tensor:
    """An ellipse (1 inside, anti-aliased edge) inscribed in a bounding box given in pixels."""
    b, h, w = _size(like, width, height)
    return ellipse(h, w, x, y, box_width, box_height)[None].expand(b, h, w).clone()


@node(category="mask/shapes", outputs={"mask": MASK})
def GridCellMask(
    position: Annotated[str, Spec(choices=GRID_POSITIONS, tooltip="Cell of a 3x3 grid (the shapes world's positions).")] = "center",
    grow_pixels: Annotated[int, Spec(min=0, max=1024, tooltip="Extend the cell by this many pixels on every side.")] = 0,
    width: Annotated[int, Spec(min=3, max=16384, tooltip="Mask width (ignored when 'like' is linked).")] = 128,
    height: Annotated[int, Spec(min=3, max=16384)] = 128,
    like: _SIZE_LINK = None,
) -> torch.Tensor:
    """One cell of a 3x3 grid (pixels whose centre lies in it), e.g. the cell of a shapes-dit object."""
    b, h, w = _size(like, width, height)
    cell = grid_cell(h, w, GRID_POSITIONS.index(position))
    if grow_pixels:
        r, c = divmod(GRID_POSITIONS.index(position), 3)
        x0, x1 = c * w / 3 - grow_pixels, (c + 1) * w / 3 + grow_pixels
        y0, y1 = r * h / 3 - grow_pixels, (r + 1) * h / 3 + grow_pixels
        cell = rectangle(h, w, x0, y0, x1 - x0, y1 - y0).round()
    return cell[None].expand(b, h, w).clone()


# ---------------------------------------------------------------------------------------------
# operations


@node(category="mask", outputs={"mask": MASK})
def InvertMask(mask: MASK) -> torch.Tensor:
    """1 - mask: swap the area to change and the area to keep."""
    return 1.0 - as_mask(mask)


@node(category="mask", outputs={"mask": MASK})
def GrowMask(
    mask: MASK,
    pixels: vocab.grow_pixels("Grow (> 0) or shrink (< 0) by this many pixels.", minimum=-512) = 4,
) -> torch.Tensor:
    """Grow or shrink a mask by a disc of the given radius."""
    return grow(mask, pixels)


@node(category="mask", outputs={"mask": MASK})
def BlurMask(
    mask: MASK,
    radius: vocab.feather("Feather width in pixels.") = 4.0,
) -> torch.Tensor:
    """Feather a mask's edges (Gaussian blur)."""
    return blur(mask, radius)


@node(category="mask", outputs={"mask": MASK})
def ThresholdMask(mask: MASK, threshold: Annotated[float, Spec(min=0.0, max=1.0, step=0.01)] = 0.5) -> torch.Tensor:
    """A hard mask: 1 where the mask is at least ``threshold``."""
    return (as_mask(mask) >= threshold).float()


@node(category="mask", outputs={"mask": MASK})
def CombineMasks(
    first: MASK,
    second: MASK,
    operation: Annotated[str, Spec(choices=["union", "intersection", "subtract", "add", "multiply", "difference"])] = "union",
) -> torch.Tensor:
    """Combine two masks (the second is resized to the first when sizes differ)."""
    a, b = as_mask(first), as_mask(second)
    if a.shape[-2:] != b.shape[-2:]:
        b = F.interpolate(b[:, None], size=a.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    ops = {
        "union": torch.maximum,
        "intersection": torch.minimum,
        "subtract": lambda p, q: (p - q).clamp(0, 1),
        "add": lambda p, q: (p + q).clamp(0, 1),
        "multiply": torch.mul,
        "difference": lambda p, q: (p - q).abs(),
    }
    return ops[operation](a, b)
