"""The shapes-video world (training/video_world.py): motions, conflicts, grammar, rendering."""

import numpy as np
import pytest
import torch

from training import video_world as vw
from training import world


def test_caption_grammar_examples():
    s = world.Scene(background=6, objects=[world.SceneObject(shape=0, colour=0, size=1, cell=3),
                                           world.SceneObject(shape=1, colour=2, size=0, cell=2)])
    assert vw.caption(vw.Clip(s, [1, 4])) == ("a large red circle moving right from the left and a small blue "
                                              "square staying at the top right on a white background")
    s = world.Scene(background=5, objects=[world.SceneObject(shape=2, colour=7, size=0, cell=4)])
    assert vw.caption(vw.Clip(s, [4])) == "a small black triangle staying in the center on an orange background"
    assert vw.caption(vw.Clip(s, [2])) == "a small black triangle moving up from the center on an orange background"


def test_sampling_rules_and_determinism():
    b = vw.sample_clips(400, seed=3)
    assert vw.captions(b) == vw.captions(vw.sample_clips(400, seed=3))
    assert vw.captions(b) != vw.captions(vw.sample_clips(400, seed=4))
    v = b.scenes.valid
    assert set(b.motion[v].tolist()) == set(range(5))  # all five motions occur
    assert vw.allowed_motions()[b.scenes.cell[v], b.motion[v]].all()  # never leaves the grid
    cells = vw.frame_cells(b)
    two = v[:, 1]
    assert not (cells[two, 0] == cells[two, 1]).any()  # never one cell on any frame
    assert not (cells[two, 0, :, None] == cells[two, 1, None, :]).any()  # nor one after the other
    cx, cy = vw.centres(b)
    moving = v & (b.motion != vw.STILL)
    dist = torch.hypot(cx[..., -1] - cx[..., 0], cy[..., -1] - cy[..., 0])
    assert torch.allclose(dist[moving], torch.tensor(world.CELL))  # one cell, jitter kept
    assert (dist[v & (b.motion == vw.STILL)] == 0).all()
    assert torch.allclose(cx[..., 8] - cx[..., 0], (cx[..., 16] - cx[..., 0]) / 2, atol=1e-4)  # linear


def test_parser_round_trip_and_rejects():
    b = vw.sample_clips(200, seed=5)
    for c, cap in zip(b.clips(), vw.captions(b), strict=True):
        p = vw.parse_caption(cap)
        assert p.motions == c.motions and p.scene.background == c.scene.background
        assert [(o.shape, o.colour, o.size, o.cell) for o in p.scene.objects] == \
               [(o.shape, o.colour, o.size, o.cell) for o in c.scene.objects]
        assert vw.caption(p) == cap
    for bad in ("a small red circle at the top on a blue background",  # image grammar
                "a small red circle moving left from the top left on a blue background",  # leaves the grid
                "a small red circle moving sideways from the top on a blue background"):
        with pytest.raises(ValueError):
            vw.parse_caption(bad)


def test_render_moves_and_first_frame():
    clip = vw.parse_caption("a large red square moving down from the top on a white background")
    v = vw.render_clip(clip)
    assert v.shape == (17, 128, 128, 3) and v.dtype == np.uint8
    assert tuple(v[0, 21, 64]) == (220, 40, 40) and tuple(v[0, 64, 64]) == (245, 245, 245)
    assert tuple(v[16, 64, 64]) == (220, 40, 40) and tuple(v[16, 21, 64]) == (245, 245, 245)
    batch = vw.clips_to_batch([clip])
    image, clips, caps = vw.i2v_pairs(batch)
    assert torch.equal(image, vw.first_frames(batch)) and caps == [vw.caption(clip)]
    f = vw.render_clips(batch, out="float")
    assert f.shape == (1, 17, 3, 128, 128) and f.min() >= -1 and f.max() <= 1
