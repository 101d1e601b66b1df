"""bench/shapes_video.py stays runnable: 1 held-out clip, 1 step, t2v and i2v through the shipped
graphs on tiny random models (train_video's tiny shapes-video, a 128 px shapes-dit). No timing asserted."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.shapes_video import save_tiny_shapes_video
from tests.fixtures.tiny_models import tiny_base


def test_shapes_video_bench_smoke(tmp_path):
    from bench import shapes_video as bench

    models = tmp_path / "models"
    save_tiny_shapes_video(models / "checkpoints" / "shapes-video")
    (models / "checkpoints" / "shapes-dit").mkdir(parents=True)
    tiny_base(models / "checkpoints" / "shapes-dit")
    bench.main(["--n", "1", "--steps", "1", "--image-steps", "1", "--device", "cpu", "--models", str(models),
                "--modes", "t2v", "i2v", "i2v_render", "--out", str(tmp_path / "sv.json")])  # its overrides: conftest
    written = json.loads((tmp_path / "sv.json").read_text())
    assert written["device"] == "cpu" and written["held_out_seed"] == 987654321
    assert [(r["mode"], r["steps"], r["clips"]) for r in written["rows"]] == [("t2v", 1, 1), ("i2v", 1, 1),
                                                                               ("i2v_render", 1, 1)]
    for row in written["rows"]:
        for key in ("object_accuracy", "prompt_accuracy", "motion_accuracy", "temporal_stability"):
            assert 0 <= row[key] <= 1, (row["mode"], key)
        assert row["seconds_per_clip"] > 0
        assert ("i2v_psnr_mean" in row) == (row["mode"] != "t2v")
    assert "given_prompt_accuracy" in written["rows"][1]


def test_held_out_clips_are_the_evaluators():
    from bench.shapes_video import held_out
    from training import video_world as vw

    captions, image_captions, frames = held_out(3)
    assert captions == vw.captions(vw.sample_clips(3, 987654321))
    assert frames.shape == (3, 128, 128, 3)
    for caption, image_caption in zip(captions, image_captions, strict=True):
        assert vw.world.caption(vw.parse_caption(caption).scene) == image_caption  # frame 0 of that clip


def test_variants_reach_only_the_video_sampler():
    from bench.shapes_video import I2V, T2V, base_workflow, parse_variant

    assert parse_variant("graph") == {}
    variant = parse_variant("cfg=2,shift=5.5,sampler=heun")
    assert variant == {"cfg": 2, "shift": 5.5, "sampler": "heun"}
    assert base_workflow("t2v", "cpu", variant).nodes[T2V["video_sampler"]].inputs["sampler"] == "heun"
    shipped, swept = base_workflow("i2v", "cpu"), base_workflow("i2v", "cpu", {"cfg": 2.5})
    assert swept.nodes[I2V["video_sampler"]].inputs["cfg"] == 2.5
    image_sampler = I2V["samplers"][0]
    assert swept.nodes[image_sampler].inputs["cfg"] == shipped.nodes[image_sampler].inputs["cfg"]  # shapes-dit's own


@pytest.mark.parametrize("text, message", [("shift", "not NAME=VALUE"), ("=3", "not NAME=VALUE"),
                                           ("cfgg=3", "cfgg: not among shapes-t2v's video sampler inputs"),
                                           ("steps=3", "steps: not among")])  # the bench sets steps itself
def test_bad_variants_name_what_is_wrong(text, message):
    from bench.shapes_video import base_workflow, parse_variant

    with pytest.raises(ValueError, match=message):
        base_workflow("t2v", "cpu", parse_variant(text))


def test_a_validation_caption_seed_is_recorded_as_such(tmp_path):
    from bench import shapes_video as bench

    models = tmp_path / "models"
    save_tiny_shapes_video(models / "checkpoints" / "shapes-video")
    bench.main(["--n", "1", "--steps", "1", "--device", "cpu", "--models", str(models), "--modes", "t2v",
                "--caption-seed", "24680", "--variants", "graph", "shift=5", "--out", str(tmp_path / "v.json")])
    written = json.loads((tmp_path / "v.json").read_text())
    assert written["caption_seed"] == 24680 and "held_out_seed" not in written
    assert [r.get("variant") for r in written["rows"]] == [None, "shift=5"]


def test_each_finished_row_is_written_at_once(tmp_path, monkeypatch):
    """A run cut short (a device call's timeout) keeps the rows it finished."""
    from bench import shapes_video as bench

    models = tmp_path / "models"
    save_tiny_shapes_video(models / "checkpoints" / "shapes-video")
    written = []
    monkeypatch.setattr(bench, "write_result", lambda name, data, path: written.append(len(data["rows"])))
    bench.main(["--n", "1", "--steps", "1", "--device", "cpu", "--models", str(models), "--modes", "t2v",
                "--caption-seed", "24680", "--variants", "graph", "cfg=2", "--out", str(tmp_path / "w.json")])
    assert written == [1, 2, 2]  # after each row, then the whole result
