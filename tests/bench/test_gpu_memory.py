"""bench/gpu_memory.py --tiny: the storage × plan × cap grid and the switch test run on CPU."""

from __future__ import annotations

import json

import pytest

from bench import gpu_memory


def test_tiny_grid_and_switch(tmp_path):
    pytest.importorskip("torchao", reason="torchao (the 'fast' extra) is not installed")
    out = tmp_path / "gpu_memory.json"
    gpu_memory.main(["--tiny", "--models", "flux-dev", "--storages", "bf16,int8", "--caps", "12,8",
                     "--steps", "1", "--out", str(out)])
    report = json.loads(out.read_text())["gpu_memory"]
    rows = report["models"]["flux-dev"]["rows"]
    assert len(rows) == 3 * 2 * 3  # caps (none, 12, 8) × storages × plans
    assert rows["cap=none bf16 resident"]["drift"] == 0.0
    assert rows["cap=none bf16 blocks"]["drift"] < 1e-5  # streaming changes where weights live, not results
    assert 0 < rows["cap=none int8 resident"]["drift"] < 0.2
    assert rows["cap=12.0 bf16 auto"]["plan"]["mode"] == "stream"
    assert rows["cap=8.0 bf16 auto"]["plan"]["resident_blocks"] <= rows["cap=12.0 bf16 auto"]["plan"]["resident_blocks"]
    stages = report["switch"]["stages"]
    assert [s["model"] for s in stages] == ["flux-dev", "sd3.5-large", "flux-dev"]
    assert all("error" not in s and s["finite"] for s in stages) and stages[2].get("reused")


def test_unknown_storage_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_memory.main(["--tiny", "--storages", "fp4", "--out", str(tmp_path / "x.json")])


def _e2e(tmp_path, *extra):
    out = tmp_path / "gpu_memory.json"
    gpu_memory.main(["--e2e", "--tiny", "--steps", "1", "--out", str(out), *extra])
    return json.loads(out.read_text())["gpu_memory"]


def test_tiny_end_to_end_rows_and_switch(tmp_path):
    """Text encoders + transformer + VAE placed by the planner: the reference row runs first,
    streaming changes nothing, fp8 storage drifts a little, and the switch test reuses Flux."""
    report = _e2e(tmp_path, "--rows", "flux-dev/none/fp8_e4m3/auto,flux-dev/none/bf16/blocks,flux-dev/8/bf16/auto",
                  "--switch-cap", "16")
    rows = report["e2e"]["rows"]
    assert list(rows)[0] == "flux-dev cap=none bf16 resident"  # the drift reference, added first
    assert all("error" not in r and r["finite"] for r in rows.values()), rows
    assert rows["flux-dev cap=none bf16 resident"]["drift"] == 0.0
    assert rows["flux-dev cap=none bf16 blocks"]["drift"] < 1e-5
    assert rows["flux-dev cap=none bf16 blocks"]["plan"]["t5"]["mode"] == "blocks"
    assert 0 < rows["flux-dev cap=none fp8_e4m3 auto"]["drift"] < 0.2
    capped = rows["flux-dev cap=8.0 bf16 auto"]
    assert capped["plan"]["t5"]["mode"] == "model" and any("t5:" in line for line in capped["plan_lines"])
    assert set(capped["plan"]) == {"transformer", "clip_l", "t5", "vae"}
    stages = report["switch_e2e"]["stages"]
    assert [s["model"] for s in stages] == ["flux-dev", "sd3.5-large", "flux-dev"]
    assert all("error" not in s and s["finite"] for s in stages) and stages[2].get("reused")


def test_isolated_rows_record_their_result_or_their_timeout(tmp_path):
    """On a GPU each row runs in a subprocess: its result comes back; a hung row is recorded and the file kept."""
    report = _e2e(tmp_path, "--isolate", "--rows", "flux-dev/none/bf16/resident", "--switch-cap", "0")
    row = report["e2e"]["rows"]["flux-dev cap=none bf16 resident"]
    assert row["finite"] and row["drift"] == 0.0 and report["e2e"]["isolated"]
    report = _e2e(tmp_path, "--isolate", "--row-timeout", "0.01", "--rows", "sd3.5-large/none/bf16/resident",
                  "--switch-cap", "0")
    assert report["e2e"]["rows"]["sd3.5-large cap=none bf16 resident"]["error"].startswith("timed out")


def test_bad_rows_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="model/cap/storage/plan"):
        _e2e(tmp_path, "--rows", "flux-dev/12/fp8")
    with pytest.raises(SystemExit, match="unknown rows"):
        _e2e(tmp_path, "--rows", "flux-dev/12/fp4/auto")
