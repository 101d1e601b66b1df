"""The shipped workflows in graphs/: structurally valid, and the default one runs.

Real-family graphs name model folders a user provides (FLUX.1-dev, ...), which are not here.
So validation runs against a temporary models folder holding an empty placeholder for every
file a graph names: that checks everything the validator checks (types, links, values,
ranges, choices, file confinement) except the files' contents. The default graph also runs
end to end, on a tiny random shapes-dit (and on the real bundled weights when present).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from app.core import paths
from app.core.executor import Engine
from app.core.registry import default_registry
from app.core.workflow import Workflow, errors
from tests.fixtures.tiny_models import save_family

GRAPHS = sorted((Path(__file__).resolve().parents[2] / "graphs").glob("*.json"))
DEFAULT_PROMPT = "a large red circle at the top left and a small blue square in the center on a white background"


def test_graphs_exist():
    names = {g.stem for g in GRAPHS}
    assert {"shapes-txt2img", "pixart-sigma-txt2img", "sd3-txt2img", "flux-txt2img", "sana-txt2img",
            "lumina2-txt2img"} <= names


def _file_inputs(workflow: Workflow) -> list[tuple[str, str]]:
    registry = default_registry()
    found = []
    for inst in workflow.nodes.values():
        nd = registry.get(inst.type)
        for name, decl in nd.inputs.items():
            value = inst.inputs.get(name)
            if decl.spec.file and isinstance(value, str) and value:
                found.append((decl.spec.file, value))
    return found


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda p: p.stem)
def test_graph_is_valid_with_its_files_present(graph, tmp_path, monkeypatch):
    document = json.loads(graph.read_text())
    assert document["format"] == "ditgraph/workflow"
    workflow = Workflow.from_dict(document)
    registry = default_registry()
    unknown = [i.type for i in workflow.nodes.values() if registry.get(i.type) is None]
    assert not unknown, f"unknown node types {unknown}"
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    monkeypatch.setitem(paths._overrides, "inputs", tmp_path / "input")
    for kind, name in _file_inputs(workflow):
        root = paths.roots(kind)[0]
        (root / name).mkdir(parents=True, exist_ok=True)
    problems = errors(Engine(registry=registry, device="cpu").validate(workflow))
    assert not problems, "\n".join(map(str, problems))
    assert set(document["layout"]["nodes"]) == set(document["nodes"])  # every node placed


def test_default_graph_is_the_documented_one():
    document = json.loads((GRAPHS[0].parent / "shapes-txt2img.json").read_text())
    nodes = document["nodes"]
    assert nodes["1"]["inputs"]["checkpoint"] == "shapes-dit"
    assert nodes["2"]["inputs"]["text"] == DEFAULT_PROMPT
    assert nodes["5"]["type"] == "Sampler" and nodes["5"]["inputs"]["steps"] == 28
    assert "seed" in nodes["5"]["inputs"]  # README: --set 5.seed=7
    assert nodes["7"]["type"] == "SaveImage" and nodes["7"]["inputs"]["filename_prefix"] == "shapes-txt2img"


def test_default_graph_runs_on_a_tiny_shapes_model(tmp_path, monkeypatch):
    save_family("shapes-dit", tmp_path / "models" / "checkpoints" / "tiny-shapes")
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    document = json.loads((GRAPHS[0].parent / "shapes-txt2img.json").read_text())
    document = copy.deepcopy(document)
    document["nodes"]["1"]["inputs"]["checkpoint"] = "tiny-shapes"
    document["nodes"]["4"]["inputs"].update(width=32, height=32)
    document["nodes"]["5"]["inputs"]["steps"] = 2
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(document).raise_for_status()
    assert result.ui["7"]["images"][0]["filename"] == "shapes-txt2img_00001.png"


@pytest.mark.skipif(not (paths.BUNDLED_MODELS / "shapes-dit" / "ditgraph.json").is_file(),
                    reason="bundled shapes-dit weights not present yet")
def test_default_graph_runs_on_the_bundled_model(tmp_path):
    document = json.loads((GRAPHS[0].parent / "shapes-txt2img.json").read_text())
    document["nodes"]["5"]["inputs"]["steps"] = 4  # the wiring and the real weights, not the full quality run
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(document).raise_for_status()
    image = result.outputs.get("7")
    saved = result.ui["7"]["images"][0]
    assert (tmp_path / "out" / saved["filename"]).is_file() and image == ()


def test_the_distilled_student_draws_the_prompt_in_one_step(tmp_path):
    """graphs/shapes-1step.json on the shipped shapes-dit-turbo: one Euler step, no CFG, and the
    evaluator finds the prompt's objects (the teacher needs 28 steps with CFG for that)."""
    from training import evaluate

    document = json.loads((GRAPHS[0].parent / "shapes-1step.json").read_text())
    prompt = "a large red circle at the top left and a small blue square in the center on a white background"
    document["nodes"]["2"]["inputs"]["text"] = prompt
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(document, targets=["6"]).raise_for_status()
    image = result.output("6")[0].float().clamp(0, 1).mul(255).round().byte().numpy()
    scores = evaluate.score_images([image], [prompt])
    assert scores["prompt_accuracy"] == 1.0, scores
