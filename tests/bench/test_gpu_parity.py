"""bench/gpu_parity.py --tiny: the HiDream row's code path (both sides, FLOP count) runs on CPU."""

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
