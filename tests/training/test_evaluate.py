"""The evaluator (training/evaluate.py): ground truth scores high, corrupted images score low."""

import json

import numpy as np
import torch

from training import evaluate as ev
from training import world


def _gt(n=200, seed=11, style="plain"):
    b = world.sample_scenes(n, seed=seed)
    return b, world.render(b, style=style).permute(0, 2, 3, 1).numpy(), world.captions(b)


def test_ground_truth_scores_high():
    _, imgs, caps = _gt()
    r = ev.score_images(imgs, caps)
    assert r["object_accuracy"] >= 0.99
    assert r["background_accuracy"] >= 0.99
    assert r["prompt_accuracy"] >= 0.98


def test_shuffled_colours_score_low():
    _, imgs, caps = _gt(100)
    labels = ev.palette_labels(imgs.reshape(-1, 128, 3)).reshape(imgs.shape[:3])
    perm = np.roll(np.arange(8), 3)  # every colour becomes another one
    shuffled = world.PALETTE.numpy().astype(np.uint8)[perm[labels]]
    r = ev.score_images(shuffled, caps)
    assert r["object_accuracy"] < 0.1 and r["background_accuracy"] < 0.1


def test_wrong_shapes_score_low():
    b, _, caps = _gt(100, seed=12)
    b.shape = (b.shape + 1) % 3
    wrong = world.render(b).permute(0, 2, 3, 1).numpy()
    r = ev.score_images(wrong, caps)
    assert r["object_accuracy"] < 0.1
    assert r["background_accuracy"] >= 0.99  # the background is still right


def test_wrong_positions_and_blank_score_low():
    b, _, caps = _gt(100, seed=13)
    b.cx, b.cy = 128 - b.cx, 128 - b.cy  # point mirror: only center-cell objects stay put
    moved = world.render(b).permute(0, 2, 3, 1).numpy()
    assert ev.score_images(moved, caps)["object_accuracy"] < 0.2
    blank = world.render(world.SceneBatch(**{**b.__dict__, "valid": torch.zeros_like(b.valid)}))
    r = ev.score_images(blank.permute(0, 2, 3, 1).numpy(), caps)
    assert r["object_accuracy"] == 0.0 and r["prompt_accuracy"] == 0.0
    noise = np.random.default_rng(0).integers(0, 256, (20, 128, 128, 3), dtype=np.uint8)
    assert ev.score_images(noise, caps[:20])["prompt_accuracy"] == 0.0


def test_fill_ratio_thresholds():
    assert ev.classify_fill(0.95) == 1 and ev.classify_fill(0.785) == 0 and ev.classify_fill(0.5) == 2


def test_control_style_edit_scores():
    b = world.sample_scenes(20, seed=14, control=True)
    imgs = world.render(b).permute(0, 2, 3, 1).numpy()
    om = world.outline_map(b)[:, 0].numpy()
    gt = [ev.control_score(imgs[i], om[i], int(b.background[i])) for i in range(20)]
    assert np.mean(gt) > 0.9
    wrong = [ev.control_score(imgs[i], om[(i + 1) % 20], int(b.background[i])) for i in range(20)]
    assert np.mean(wrong) < 0.3

    b, plain, caps = _gt(40, seed=15)
    outlined = world.render(b, style="outlined").permute(0, 2, 3, 1).numpy()
    s_out = np.nanmean([ev.style_score(i, c) for i, c in zip(outlined, caps, strict=False)])
    s_plain = np.nanmean([ev.style_score(i, c) for i, c in zip(plain, caps, strict=False)])
    assert s_out > 0.8 and s_plain < 0.2

    scene = world.parse_caption(caps[0])
    src = plain[0]
    b2 = world.sample_scenes(40, seed=15)
    b2.colour[0, 0] = (b2.colour[0, 0] + 1) % 8
    if b2.colour[0, 0] == b2.background[0]:
        b2.colour[0, 0] = (b2.colour[0, 0] + 1) % 8
    edited = world.render(b2)[0].permute(1, 2, 0).numpy()
    target = world.captions(b2)[0]
    r = ev.edit_score(src, edited, target, 0)
    assert r["changed"] and r["psnr_outside"] > 40
    assert not ev.edit_score(src, src, target, 0)["changed"]
    assert scene.objects


def test_command_line(tmp_path, capsys):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    _, imgs, caps = _gt(6, seed=16)
    with open(tmp_path / "captions.jsonl", "w") as fh:
        for i in range(3):
            Image.fromarray(imgs[i]).save(tmp_path / f"{i}.png")
            fh.write(json.dumps({"file": f"{i}.png", "caption": caps[i]}) + "\n")
    for i in range(3, 6):  # caption in PNG metadata, as ditgraph saves it
        info = PngInfo()
        info.add_text("prompt", caps[i])
        Image.fromarray(imgs[i]).save(tmp_path / f"{i}.png", pnginfo=info)
    Image.fromarray(imgs[0]).save(tmp_path / "nocap.png")
    assert ev.main([str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 6 and out["object_accuracy"] >= 0.99 and out["prompt_accuracy"] == 1.0
    assert [s["file"] for s in out["skipped"]] == ["nocap.png"]


def test_binding_score_right_on_ground_truth_and_wrong_on_swapped_colours():
    b = world.sample_scenes(60, seed=16, control=True, p_two=1.0, p_name_position=0.0)
    masks = world.object_masks(b).numpy()
    scenes = b.scenes()
    truth = world.render(b).permute(0, 2, 3, 1).numpy()
    gt = [ev.binding_score(truth[i], scenes[i], masks[i]) for i in range(60)]
    assert all(s["scene_right"] for s in gt)
    # paint each scene with its two colours swapped: only scenes whose objects the caption cannot
    # tell apart (same shape and size) or that share one colour stay right
    b.colour = b.colour.flip(1)
    swapped = world.render(b).permute(0, 2, 3, 1).numpy()
    for i, scene in enumerate(scenes):
        score = ev.binding_score(swapped[i], scene, masks[i])
        a, c = scene.objects
        same_words = (a.shape, a.size) == (c.shape, c.size) or a.colour == c.colour
        assert score["scene_right"] == same_words, (i, score)
