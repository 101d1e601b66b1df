"""``ditgraph run`` of a video workflow (a tiny Wan model): a per-step progress bar on a terminal,
and the saved video reported as one (frames, fps, size), also in --json."""

from __future__ import annotations

import json
import re

import pytest

from app.fronts.cli import main
from tests.fixtures.terminal import Terminal, run_cli_on_a_terminal
from tests.fixtures.tiny_video import STEPS, save_video_family, workflow


@pytest.fixture
def wan_workflow(tmp_path):
    save_video_family("wan", tmp_path / "models" / "checkpoints" / "tiny-wan")
    path = tmp_path / "wan.json"
    path.write_text(json.dumps(workflow("wan")))
    return str(path)


def test_video_run_draws_a_step_bar_and_reports_the_video(wan_workflow, tmp_path, capsys, monkeypatch):
    code, terminal = run_cli_on_a_terminal(["run", wan_workflow, "--device", "cpu"], tmp_path, monkeypatch,
                                           models=tmp_path / "models")
    assert code == 0
    drawn = terminal.lines()
    bars = [line for line in drawn if "sample Sampler" in line and "[" in line]
    # the sampler's line shows a bar and the step count, the last step always drawn
    assert bars and all(re.search(rf"\[[#.]{{24}}\] \d+/{STEPS}", line) for line in bars), drawn
    assert any(f"[{'#' * 24}] {STEPS}/{STEPS}" in line for line in bars)
    out = capsys.readouterr().out
    saved = [line for line in out.splitlines() if line.startswith("saved ")]
    assert len(saved) == 1 and saved[0].endswith(".mp4 (video: 9 frames at 8 fps, 16x16)"), out
    assert main(["run", wan_workflow, "--device", "cpu", "--json"]) == 0
    result = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"type": "result"' in line][-1]
    (path, info), = result["videos"].items()
    assert path in result["files"] and info == {"frames": 9, "fps": 8.0, "width": 16, "height": 16, "format": "mp4"}


def test_runs_of_a_batch_share_the_progress_line():
    """A Ray batch's runs draw on one line: the run with the latest event shows, after the counts."""
    from app.fronts.cli_support import ProgressLine

    terminal = Terminal()
    line = ProgressLine(terminal)
    line.status("ray: 0/2 done, 2 running ·")
    line({"type": "run_started", "nodes": ["a", "b"]}, key=1, label="[line 1] ")
    line({"type": "run_started", "nodes": ["a"]}, key=2, label="[line 2] ")
    line({"type": "node_started", "node": "a", "node_type": "Sampler"}, key=1, label="[line 1] ")
    line({"type": "progress", "step": 3, "total": 3}, key=1, label="[line 1] ")
    line({"type": "run_finished"}, key=2, label="[line 2] ")
    assert terminal.lines()[1:] == [
        "ray: 0/2 done, 2 running ·", "ray: 0/2 done, 2 running · [line 1] nodes 0/2 starting",
        "ray: 0/2 done, 2 running · [line 2] nodes 0/1 starting",
        "ray: 0/2 done, 2 running · [line 1] nodes 0/2 a Sampler",
        f"ray: 0/2 done, 2 running · [line 1] nodes 0/2 a Sampler [{'#' * 24}] 3/3", ""]
