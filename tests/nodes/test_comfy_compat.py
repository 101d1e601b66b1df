"""The small nodes imported ComfyUI workflows use (nodes/comfy_compat.py)."""

from __future__ import annotations

import pytest
import torch

from nodes.comfy_compat import (
    Canny,
    FluxKontextImageScale,
    ImageFromBatch,
    ImageScale,
    ImageScaleBy,
    ImageSize,
    ImageStitch,
    ManualSigmas,
    MathExpression,
    ResolutionSelector,
    ScaleToMegapixels,
    ScaleToSide,
    StringConcatenate,
)


def test_manual_sigmas_parses_and_checks_order():
    assert torch.allclose(ManualSigmas("1, 0.5,0.25 ,0"), torch.tensor([1.0, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="highest first"):
        ManualSigmas("0, 1")
    with pytest.raises(ValueError, match="numbers"):
        ManualSigmas("1, x")


def test_concatenate():
    assert StringConcatenate("a", "b", ", ") == "a, b"


def test_math_expression_is_arithmetic_only():
    assert MathExpression("max(5, round(a * 24)) + (5 - a) % 3", a=1.5) == (36.5, 36, True)
    assert MathExpression("a > 2048", a=4096) == (1.0, 1, True)
    assert MathExpression("b if a < 0 else -b", a=1, b=2.5)[0] == -2.5
    for evil in ("__import__('os')", "a.__class__", "[1][0]", "2 ** 100000", "open('x')"):
        with pytest.raises(ValueError):
            MathExpression(evil, a=1)


def test_image_size_and_scaling():
    image = torch.rand(2, 30, 40, 3)
    assert ImageSize(image) == (40, 30, 2)
    scaled = ScaleToMegapixels(image, "bilinear", megapixels=0.25, resolution_steps=8)
    height, width = scaled.shape[1:3]
    assert height % 8 == 0 and width % 8 == 0 and abs(width * height - 0.25 * 1024 * 1024) < 0.05 * 1024 * 1024
    assert abs(width / height - 4 / 3) < 0.05
    assert ImageScale(image, "bicubic", 20, 0, "disabled").shape == (2, 15, 20, 3)
    cropped = ImageScale(torch.arange(40.0).repeat(30, 1)[None, :, :, None].expand(1, 30, 40, 3) / 40, "nearest-exact", 30, 30,
                         "center")
    assert cropped.shape == (1, 30, 30, 3) and cropped[0, 0, 0, 0] == 5 / 40  # five columns cut on each side


def test_canny_finds_the_edge_of_a_square_and_nothing_inside():
    image = torch.zeros(1, 32, 32, 3)
    image[:, 8:24, 8:24] = 1.0
    edges = Canny(image, 0.2, 0.5)
    assert edges.shape == (1, 32, 32, 3) and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert edges[0, 16, 5:11, 0].sum() >= 1 and edges[0, 14:18, 14:18].sum() == 0 and edges[0, :3, :3].sum() == 0
    assert Canny(torch.full((1, 16, 16, 3), 0.5), 0.1, 0.2).sum() == 0


def test_image_scale_by_keeps_the_aspect_ratio():
    image = torch.rand(2, 30, 40, 3)
    assert ImageScaleBy(image, "bilinear", 0.5).shape == (2, 15, 20, 3)
    assert torch.equal(ImageScaleBy(image, "nearest-exact", 1.0), image)


def test_scale_to_side_and_kontext_size():
    image = torch.rand(1, 30, 40, 3)
    assert ScaleToSide(image, "bilinear", "longer", 80).shape == (1, 60, 80, 3)
    assert ScaleToSide(image, "bilinear", "shorter", 15).shape == (1, 15, 20, 3)
    assert FluxKontextImageScale(image).shape == (1, 880, 1184, 3)  # 4:3 -> the nearest Kontext size, 1184x880
    assert FluxKontextImageScale(torch.rand(1, 50, 10, 3)).shape == (1, 1568, 672, 3)  # cropped to the tallest one


def test_image_stitch_places_resizes_pads_and_spaces():
    red, blue = torch.zeros(1, 4, 6, 3), torch.zeros(2, 8, 4, 3)
    red[..., 0], blue[..., 2] = 1.0, 1.0
    right = ImageStitch(red, blue, "right", True, 0, "white")
    assert right.shape == (2, 4, 8, 3) and right[0, 0, 0, 0] == 1 and right[0, 0, -1, 2] == 1  # blue scaled to 4 high
    left = ImageStitch(red, blue, "left", False, 2, "black")  # padded to 8 high, 2 black pixels between
    assert left.shape == (2, 8, 12, 3) and left[1, 0, 0, 2] == 1 and left[1, 0, 4:6].sum() == 0 and left[1, 0, 6].sum() == 0
    down = ImageStitch(red, torch.ones(1, 2, 6, 4), "down", True, 0, "white")  # an alpha channel: red gets alpha 1
    assert down.shape == (1, 6, 6, 4) and down[0, 0, 0, 3] == 1
    assert ImageStitch(red, None) is red


def test_resolution_selector_and_image_from_batch():
    assert ResolutionSelector("16:9 (Widescreen)", 1.0, 8) == (1368, 768)  # what ComfyUI computes
    assert ResolutionSelector("1:1 (Square)", 2.0, 16) == (1456, 1456)
    batch = torch.arange(5.0)[:, None, None, None].expand(5, 2, 2, 3)
    assert ImageFromBatch(batch, 1, 2)[:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert ImageFromBatch(batch, 9, 3)[:, 0, 0, 0].tolist() == [4.0]  # past the end: the last one (as ComfyUI)
