"""training/train_turbo.py: the CPU smoke mode trains, writes a loadable student, resumes; the
shipped few-step graphs run on what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from tests.fixtures.tiny_models import tiny_base

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


@pytest.fixture(scope="module")
def student(tmp_path_factory, one_thread):
    from training import train_turbo

    root = tmp_path_factory.mktemp("turbo")
    base = tiny_base(root / "base")
    out = root / "models" / "checkpoints" / "shapes-dit-turbo"
    assert train_turbo.main(["--tiny", "--steps", "3", "--base", str(base), "--out", str(out)]) == 0
    return base, out


def test_student_folder_and_record(student):
    base, out = student
    manifest = json.loads((out / "ditgraph.json").read_text())
    assert manifest["family"] == "shapes-dit" and manifest["variant"] == "shapes-dit-turbo"
    assert manifest["defaults"]["steps"] == 4 and manifest["defaults"]["cfg"] == 1.0
    state = json.loads((out / "train_state.json").read_text())
    assert state["steps"] == 3 and len(state["runs"]) == 1
    assert {"student_1step", "student_4step", "teacher_4step"} <= set(state["eval"])
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "transformer" / "diffusion_pytorch_model.safetensors").values()} \
        == {torch.float16}
    trained = SD3Transformer2DModel.from_pretrained(out / "transformer")
    teacher = SD3Transformer2DModel.from_pretrained(base / "transformer")
    moved = [not torch.equal(a.half(), b.half()) for a, b in zip(trained.parameters(), teacher.parameters(), strict=True)]
    assert any(moved)  # the EMA took the reflow steps


def test_resume_continues_the_record(student, tmp_path, one_thread):
    from training import train_turbo

    base, out = student
    again = tmp_path / "again"
    assert train_turbo.main(["--tiny", "--steps", "2", "--base", str(base), "--resume", str(out),
                             "--out", str(again)]) == 0
    state = json.loads((again / "train_state.json").read_text())
    assert state["steps"] == 5 and [r["steps"] for r in state["runs"]] == [3, 2]


@pytest.mark.parametrize("graph", ["shapes-turbo", "shapes-1step"])
def test_few_step_graphs_run_on_the_student(graph, student, tmp_path, monkeypatch, one_thread):
    _base, out = student
    monkeypatch.setitem(paths._overrides, "models", out.parent.parent)
    document = json.loads((GRAPHS / f"{graph}.json").read_text())
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(document, targets=["7", "1"]).raise_for_status()
    steps = document["nodes"]["5"]["inputs"]["steps"]
    assert steps == {"shapes-turbo": 4, "shapes-1step": 1}[graph]
    model = result.output("1", 0)
    assert model.defaults["variant"] == "shapes-dit-turbo"
    assert result.ui["7"]["images"][0]["filename"].startswith(graph)
