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
