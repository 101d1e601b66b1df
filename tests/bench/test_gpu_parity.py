"""bench/gpu_parity.py --tiny: the HiDream and video (Wan, LTX-Video) rows' code paths (both sides,
FLOP count, every frame decoded) run on CPU."""

from __future__ import annotations

import json

import pytest

from bench import gpu_parity


@pytest.mark.usefixtures("one_thread")
def test_tiny_hidream_row(tmp_path):
    out = tmp_path / "gpu_parity.json"
    assert gpu_parity.main(["--tiny", "--models", "hidream", "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["family"] == "hidream" and row["scheduler_pipeline"] == "FlowMatchEulerDiscreteScheduler"
    assert row["ours_mode"].startswith("Engine.run") and row["ratio_ours_over_pipeline"] > 0
    assert row["transformer_tflop_per_step"] is not None
    # 2 steps: the two schedules' last sigmas differ a little (28 steps: 1e-3); the model call is the same
    assert row["image_rel_l2_ours_vs_pipeline"] < 0.1


@pytest.mark.usefixtures("one_thread")
def test_tiny_video_rows(tmp_path):
    out = tmp_path / "gpu_parity.json"
    assert gpu_parity.main(["--tiny", "--models", "wan,ltx", "--repeats", "1", "--out", str(out)]) == 0
    wan, ltx = json.loads(out.read_text())["results"]
    for row, (width, height, frames) in ((wan, (32, 16, 5)), (ltx, (64, 32, 9))):
        assert (row["width"], row["height"], row["frames"]) == (width, height, frames), row["family"]
        assert row["frames_decoded"] == frames and row["ratio_target"] == 1.02
        assert row["ours_mode"].startswith("Engine.run") and row["ratio_ours_over_pipeline"] > 0
        assert row["transformer_tflop_per_step"] is not None and "28 steps" in row["video_choice"]
        assert row["ours_stage_timings_s"]["sample"] > 0
        # both sides' stages, over interleaved runs
        assert row["repeats"] == 1 and set(row["stage_medians_s"]["pipeline"]) == {"encode", "sample", "decode"}
        assert row["ratio_by_stage"]["sample"] > 0 and row["ratio_by_stage"]["decode"] > 0
        assert row["spread"]["ours"]["min"] == row["ours_min_s"] and row["gc_pause_s"]["pipeline"] >= 0
    assert (wan["family"], ltx["family"]) == ("wan", "ltx")
    assert ltx["image_rel_l2_ours_vs_pipeline"] < 1e-4  # same schedule, same modules, fp32: the same frames
    # Wan's pipeline spaces timesteps 1000..1 (2 steps: sigmas 1, 0.009, 0), ours 1..0 (1, 0.75, 0): the frames
    # differ a little (28 steps: 3e-5)
    assert wan["image_rel_l2_ours_vs_pipeline"] < 0.1


def test_frames_that_do_not_fit_the_vae_are_refused(tmp_path):
    with pytest.raises(ValueError, match="frames must be a multiple of 8 plus 1 for ltx"):
        gpu_parity.main(["--tiny", "--models", "ltx", "--frames", "12", "--out", str(tmp_path / "x.json")])


def test_short_video_runs_get_more_repeats():
    assert gpu_parity.auto_repeats(2.0, 30.0) == 15 and gpu_parity.auto_repeats(11.0, 30.0) == 3
    assert gpu_parity.auto_repeats(8.0, 30.0) == 4 and gpu_parity.auto_repeats(2.0, 0.0) == 3
