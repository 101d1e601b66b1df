"""Mask tools (nodes/mask.py): shapes without drawing, masks from images, grow/blur/invert/combine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from app.models.masks import as_mask, parse_colour
from nodes.mask import (
    GRID_POSITIONS,
    BlurMask,
    CombineMasks,
    EllipseMask,
    GridCellMask,
    GrowMask,
    InvertMask,
    LoadImageMask,
    MaskFromColor,
    MaskFromImage,
    MaskToImage,
    RectangleMask,
    SolidMask,
    ThresholdMask,
)


def test_rectangle_covers_its_area_exactly():
    m = RectangleMask(x=10, y=20, box_width=30, box_height=12, width=64, height=48)
    assert m.shape == (1, 48, 64)
    assert m.sum() == 30 * 12 and m[0, 20:32, 10:40].min() == 1
    assert m[0, :20].sum() == 0 and m[0, :, :10].sum() == 0
    clipped = RectangleMask(x=-8, y=-8, box_width=16, box_height=16, width=32, height=32)
    assert clipped.sum() == 64


def test_ellipse_area_and_symmetry():
    m = EllipseMask(x=8, y=16, box_width=48, box_height=32, width=64, height=64)[0]
    assert abs(float(m.sum()) - math.pi * 24 * 16) < 0.01 * math.pi * 24 * 16
    assert torch.allclose(m, m.flip(1)) and m[32, 32] == 1 and m[0, 0] == 0
    assert ((m > 0) & (m < 1)).any()  # anti-aliased edge


def test_grid_cells_match_the_shapes_world():
    from training import world

    total = torch.zeros(128, 128)
    for index, position in enumerate(GRID_POSITIONS):
        m = GridCellMask(position=position)[0]
        y0, y1, x0, x1 = world.cell_bounds(index)
        expected = torch.zeros(128, 128)
        expected[y0:y1, x0:x1] = 1
        assert torch.equal(m, expected), position
        total += m
    assert torch.equal(total, torch.ones(128, 128))  # the cells tile the image
    grown = GridCellMask(position="center", grow_pixels=4)[0]
    y0, y1, x0, x1 = world.cell_bounds(4)
    assert grown[y0 - 4:y1 + 4, x0 - 4:x1 + 4].min() == 1 and grown.sum() == (y1 - y0 + 8) * (x1 - x0 + 8)


def test_size_from_an_image():
    image = torch.zeros(2, 40, 24, 3)
    assert SolidMask(0.5, like=image).shape == (2, 40, 24)
    assert GridCellMask("top", like=image).shape == (2, 40, 24)


def test_grow_shrink_and_invert():
    m = RectangleMask(x=20, y=20, box_width=10, box_height=10, width=64, height=64)
    grown, shrunk = GrowMask(m, 3), GrowMask(m, -3)
    assert grown.sum() > m.sum() > shrunk.sum()
    assert grown[0, 17, 25] == 1 and grown[0, 16, 25] == 0  # radius 3 straight out
    assert shrunk.sum() == 4 * 4
    assert torch.equal(GrowMask(m, 0), m)
    assert torch.equal(InvertMask(InvertMask(m)), m) and InvertMask(m).sum() == 64 * 64 - 100


def test_blur_feathers_but_keeps_the_mass():
    m = RectangleMask(x=20, y=20, box_width=20, box_height=20, width=64, height=64)
    b = BlurMask(m, 6.0)
    assert abs(float(b.sum() - m.sum())) < 1.0
    assert b[0, 30, 30] > 0.99 and 0 < b[0, 30, 19] < 1
    assert torch.equal(BlurMask(m, 0.0), m)
    assert torch.equal(ThresholdMask(b, 0.5), (b >= 0.5).float())


def test_combine():
    a = RectangleMask(x=0, y=0, box_width=8, box_height=8, width=16, height=16)
    b = RectangleMask(x=4, y=4, box_width=8, box_height=8, width=16, height=16)
    assert CombineMasks(a, b, "union").sum() == 64 + 64 - 16
    assert CombineMasks(a, b, "intersection").sum() == 16
    assert CombineMasks(a, b, "subtract").sum() == 48
    assert CombineMasks(a, RectangleMask(x=0, y=0, box_width=16, box_height=16, width=32, height=32), "union").shape == (1, 16, 16)


def test_mask_from_colour_and_channel():
    image = torch.zeros(1, 8, 8, 3)
    image[0, :4] = torch.tensor([220, 40, 40]) / 255
    image[0, 4:] = torch.tensor([245, 245, 245]) / 255
    red = MaskFromColor(image, "220,40,40", 0.05)
    assert red[0, :4].min() == 1 and red[0, 4:].max() == 0
    assert torch.equal(MaskFromColor(image, "#f5f5f5", 0.0), 1 - red)
    assert torch.allclose(MaskFromImage(image, "green")[0, 0, 0], torch.tensor(40 / 255))
    assert MaskFromImage(image, "luminance")[0, 7, 7] > 0.9
    with pytest.raises(ValueError, match="colour"):
        parse_colour("not-a-colour")
    assert MaskToImage(red).shape == (1, 8, 8, 3)


def test_load_image_mask_alpha(tmp_path):
    rgba = np.zeros((6, 10, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, :5, 3] = 0  # left half transparent = area to fill
    rgba[..., 0] = 200
    path = tmp_path / "m.png"
    Image.fromarray(rgba, "RGBA").save(path)
    alpha = LoadImageMask(str(path), "alpha")
    assert alpha.shape == (1, 6, 10) and alpha[0, :, :5].min() == 1 and alpha[0, :, 5:].max() == 0
    assert torch.allclose(LoadImageMask(str(path), "red"), torch.full((1, 6, 10), 200 / 255))


def test_as_mask_shapes():
    assert as_mask(torch.ones(4, 4)).shape == (1, 4, 4)
    assert as_mask(torch.ones(2, 1, 4, 4)).shape == (2, 4, 4)
    with pytest.raises(ValueError):
        as_mask(torch.ones(2, 3, 4, 4))
