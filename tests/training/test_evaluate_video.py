"""The video evaluator (training/evaluate_video.py): ground truth high, corrupted clips low."""

import json

import numpy as np
import torch

from training import evaluate_video as ev
from training import video_world as vw


def test_components_label_4_connected_regions():
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    m[0, :2, :2] = True  # a 2x2 block
    m[0, 3:, 3] = True  # a column of 3
    m[0, 2, 2] = True  # diagonal neighbour only: its own component
    lab = ev.components(m)[0]
    assert len(set(lab[m[0]].tolist())) == 3 and (lab[~m[0]] == 0).all()
    st = ev.component_stats(ev.components(m))
    assert sorted(st["area"][0][st["area"][0] > 0].tolist()) == [1, 3, 4]


def test_ground_truth_high_and_corruptions_low():
    r = ev.self_test(n=8, seed=21)
    gt = r["ground_truth"]
    assert gt["object_accuracy"] == 1.0 and gt["prompt_accuracy"] == 1.0 and gt["i2v_accuracy"] == 1.0
    assert gt["temporal_stability"] >= 0.99
    assert r["corrupt_motion"]["motion_accuracy"] == 0.0 and r["corrupt_motion"]["object_accuracy"] == 0.0
    assert r["corrupt_colours"]["prompt_accuracy"] == 0.0 and r["corrupt_colours"]["i2v_accuracy"] == 0.0
    frozen = r["corrupt_frozen"]
    assert frozen["object_accuracy"] < 0.6 and frozen["start_accuracy"] == 1.0


def test_command_on_npz(tmp_path, capsys):
    b = vw.sample_clips(3, seed=8)
    videos = vw.render_clips(b).permute(0, 1, 3, 4, 2).numpy()
    videos[1] = videos[1, ::-1]  # played backwards: moving objects fail
    np.savez(tmp_path / "clips.npz", videos=videos, captions=np.array(vw.captions(b)), images=videos[:, 0])
    assert ev.main([str(tmp_path / "clips.npz"), "--json", str(tmp_path / "s.json")]) == 0
    out = json.loads((tmp_path / "s.json").read_text())
    moving = (b.motion[1][b.scenes.valid[1]] != vw.STILL).any().item()
    assert out["n"] == 3 and out["prompt_accuracy"] == (2 / 3 if moving else 1.0)


def test_command_on_folder(tmp_path):
    b = vw.sample_clips(2, seed=9)
    videos = vw.render_clips(b).permute(0, 1, 3, 4, 2).numpy()
    rows = []
    for i, (v, cap) in enumerate(zip(videos, vw.captions(b), strict=True)):
        np.save(tmp_path / f"c{i}.npy", v)
        rows.append(json.dumps({"file": f"c{i}.npy", "caption": cap}))
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    s = ev.evaluate_path(str(tmp_path))
    assert s["n"] == 2 and s["object_accuracy"] == 1.0 and not s["skipped"]


def test_command_on_animated_webp_and_gif(tmp_path):
    """Animated files are read whole (every frame): Pillow 13 under imageio's index=None gave frame 0 only."""
    import imageio.v3 as iio

    b = vw.sample_clips(2, seed=10)
    videos = vw.render_clips(b).permute(0, 1, 3, 4, 2).numpy()
    rows = []
    for i, (v, cap, ext) in enumerate(zip(videos, vw.captions(b), ("webp", "gif"), strict=True)):
        iio.imwrite(tmp_path / f"c{i}.{ext}", v, **({"lossless": True} if ext == "webp" else {}), duration=125, loop=0)
        rows.append(json.dumps({"file": f"c{i}.{ext}", "caption": cap}))
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    assert ev._read_video(str(tmp_path / "c0.webp")).shape == (vw.FRAMES, 128, 128, 3)
    s = ev.evaluate_path(str(tmp_path))
    assert s["n"] == 2 and not s["skipped"] and s["track_accuracy"] == 1.0, s
