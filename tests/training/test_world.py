"""The shapes world (training/world.py): grammar, determinism, geometry, rendering."""

import numpy as np
import pytest
import torch

from training import world
from training.world import Scene, SceneObject


def test_caption_grammar_examples():
    s = Scene(background=6, objects=[SceneObject(shape=0, colour=0, size=1, cell=0),
                                     SceneObject(shape=1, colour=2, size=0, cell=4)])
    assert world.caption(s) == (
        "a large red circle at the top left and a small blue square in the center on a white background")
    s = Scene(background=5, objects=[SceneObject(shape=2, colour=7, size=0, cell=8)])
    assert world.caption(s) == "a small black triangle at the bottom right on an orange background"
    s = Scene(background=0, objects=[SceneObject(shape=2, colour=5, size=1, cell=None)])
    assert world.caption(s) == "a large orange triangle on a red background"


def test_sampler_deterministic_by_seed():
    a, b, c = (world.sample_scenes(64, seed=s) for s in (7, 7, 8))
    assert world.captions(a) == world.captions(b)
    assert torch.equal(world.render(a), world.render(b))
    assert world.captions(a) != world.captions(c)
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    assert world.captions(world.sample_scenes(16, g1)) == world.captions(world.sample_scenes(16, g2))


def test_scene_rules():
    b = world.sample_scenes(500, seed=1)
    n = b.valid.sum(1)
    assert set(n.tolist()) == {1, 2}
    assert (b.colour != b.background[:, None])[b.valid].all()
    two = b.valid[:, 1]
    assert (b.cell[two, 0] != b.cell[two, 1]).all()
    r_nom = torch.tensor(world.SIZE_RADII)[b.size]
    assert ((b.radius - r_nom).abs() <= world.RADIUS_JITTER + 1e-5).all()
    col, row = b.cell % 3, b.cell // 3
    cx0 = (2 * col + 1).float() / 6 * 128
    cy0 = (2 * row + 1).float() / 6 * 128
    assert ((b.cx - cx0).abs() <= 4 + 1e-4).all() and ((b.cy - cy0).abs() <= 4 + 1e-4).all()
    caps = world.captions(b)
    assert any(" and " in c for c in caps) and any(" and " not in c for c in caps)
    assert any("in the center" in c for c in caps) and any("an orange background" in c for c in caps)


def test_parser_round_trip():
    b = world.sample_scenes(300, seed=2)
    for s, cap in zip(b.scenes(), world.captions(b), strict=False):
        p = world.parse_caption(cap)
        assert p.background == s.background
        assert [(o.shape, o.colour, o.size, o.cell) for o in p.objects] == \
               [(o.shape, o.colour, o.size, o.cell) for o in s.objects]
        assert world.caption(p) == cap
    with pytest.raises(ValueError):
        world.parse_caption("a photo of a cat")
    with pytest.raises(ValueError):
        world.parse_caption("a huge red circle on a blue background")


def test_render_pixels():
    s = Scene(background=2, objects=[SceneObject(shape=1, colour=3, size=1, cell=4, cx=64, cy=64, radius=19)])
    img = world.render_scene(s)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert tuple(img[64, 64]) == (235, 210, 40)
    assert tuple(img[2, 2]) == (40, 70, 220)
    # square half side 0.9*19 = 17.1: pixel centre 64+16.5 inside, 64+18.5 outside
    assert tuple(img[64, 80]) == (235, 210, 40) and tuple(img[64, 82]) == (40, 70, 220)
    # anti-aliased: some edge pixel is a blend
    edge = img[64, 81].astype(int)
    assert 40 < edge[0] < 235
    f = world.render(world.scenes_to_batch([s]), out="float")
    assert f.min() >= -1 and f.max() <= 1


def test_triangle_geometry():
    s = Scene(background=6, objects=[SceneObject(shape=2, colour=0, size=1, cell=4, cx=64, cy=64, radius=19)])
    img = world.render_scene(s)
    red = (np.abs(img.astype(int) - (220, 40, 40)).sum(-1) < 30)
    ys, xs = np.nonzero(red)
    assert abs(ys.min() - (64 - 19)) <= 3 and abs(ys.max() + 1 - (64 + 0.85 * 19)) <= 1
    assert red[60:70].sum(1).max() > red[47:50].sum(1).max()  # wider at the bottom: apex up


def test_vertex_distance_is_zero_at_corners_and_absent_for_circles():
    objs = [SceneObject(shape=1, colour=0, size=0, cell=0, cx=20.5, cy=20.5, radius=10),  # corners at 11.5, 29.5
            SceneObject(shape=2, colour=1, size=1, cell=8, cx=100.5, cy=100.5, radius=19)]  # apex at y 81.5
    b = world.scenes_to_batch([Scene(background=6, objects=objs)])
    v, d = world.vertex_distance(b), world.signed_distance(b)
    for k, (y, x) in ((0, (11, 11)), (0, (29, 29)), (0, (11, 29)), (1, (81, 100))):
        assert v[0, k, y, x] == pytest.approx(0, abs=1e-4) and abs(d[0, k, y, x]) < 1e-3  # on the outline
    assert v[0, 0, 20, 20] == pytest.approx(9 * 2 ** 0.5, abs=1e-4)  # the centre: half-diagonal away
    b.shape[0, 0] = 0  # a circle has no vertices
    assert (world.vertex_distance(b)[0, 0] == 1e4).all()


def test_outline_map_and_style():
    b = world.sample_scenes(16, seed=5, control=True)
    om = world.outline_map(b)
    assert om.shape == (16, 1, 128, 128) and om.min() >= 0 and om.max() <= 1
    d = world.signed_distance(b)
    on = om[:, 0] > 0.99
    assert (d.abs().amin(1)[on] <= 1.01).all()
    caps = world.captions(b)
    for c in caps:
        world.parse_caption(c)
    s = Scene(background=6, objects=[SceneObject(shape=1, colour=0, size=1, cell=4, cx=64, cy=64, radius=19),
                                     SceneObject(shape=0, colour=7, size=1, cell=0, cx=21, cy=21, radius=19)])
    img = world.render_scene(s, style="outlined")
    assert tuple(img[64, 64 + 17]) == (20, 20, 20)  # edge of the red square: black outline
    assert tuple(img[64, 64]) == (220, 40, 40)
    assert tuple(img[21, 21 + 19]) == (245, 245, 245)  # black circle: white outline


def test_control_scenes_off_grid_and_captions():
    b = world.sample_scenes(400, seed=9, control=True, p_name_position=0.5)
    caps = world.captions(b)
    assert any(" at the " in c or "in the center" in c for c in caps)
    assert any(" at the " not in c and "in the center" not in c for c in caps)
    on_grid = torch.tensor([(2 * c + 1) / 6 * 128 for c in range(3)])
    off = (b.cx[..., None] - on_grid).abs().amin(-1) > 4
    assert off[b.valid].float().mean() > 0.5
    two = b.valid[:, 1]
    dist = torch.hypot(b.cx[two, 0] - b.cx[two, 1], b.cy[two, 0] - b.cy[two, 1])
    assert (dist >= b.radius[two].sum(1) + 3 - 1e-4).all()
