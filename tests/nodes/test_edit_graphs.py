"""The editing workflows in graphs/edit-*.json run end to end through the Engine (tiny random
shapes-dit; the bundled model too when present), and the inpaint graph keeps what it must keep."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from tests.fixtures.tiny_models import save_family

GRAPHS = sorted((Path(__file__).resolve().parents[2] / "graphs").glob("edit-*.json"))
FAST = {"Sampler": {"steps": 2}, "ImageToImage": {"steps": 2}, "Inpaint": {"steps": 2},
        "InvertLatent": {"steps": 3, "store_steps": 2}, "EditFromInversion": {"inject_steps": 2},
        "FlowEdit": {"steps": 4, "n_max": 3}, "EmptyLatent": {"width": 32, "height": 32}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_one_graph_per_editing_method():
    assert {g.stem for g in GRAPHS} >= {"edit-img2img", "edit-inpaint", "edit-rf-solver", "edit-rf-inversion", "edit-flowedit"}


def _tiny(document: dict) -> dict:
    document = copy.deepcopy(document)
    document["nodes"]["1"]["inputs"]["checkpoint"] = "tiny-shapes"
    for inst in document["nodes"].values():
        inst["inputs"].update({k: v for k, v in FAST.get(inst["type"], {}).items() if k in inst["inputs"]})
    return document


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One engine for all graphs: the tiny checkpoint (and MiniLM) load once, then are cache hits."""
    root = tmp_path_factory.mktemp("edit-graphs")
    save_family("shapes-dit", root / "models" / "checkpoints" / "tiny-shapes")
    before = paths._overrides.get("models")
    paths._overrides["models"] = root / "models"
    yield Engine(device="cpu", output_dir=root / "out")
    if before is None:
        paths._overrides.pop("models", None)
    else:
        paths._overrides["models"] = before


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda p: p.stem)
def test_edit_graph_runs_on_a_tiny_shapes_model(graph, engine):
    document = _tiny(json.loads(graph.read_text()))
    result = engine.run(document).raise_for_status()
    saved = result.ui["21"]["images"]
    assert saved[0]["filename"] == f"{graph.stem}_00001.png"
    edit_id = document["nodes"]["20"]["inputs"]["latent"]["from"][0]
    again = engine.run(document, targets=["8", edit_id]).raise_for_status()
    assert again.executed == []  # memoized
    source, edited = again.output("8"), again.output(edit_id)
    assert edited.samples.shape == source.samples.shape and torch.isfinite(edited.samples).all()
    if graph.stem == "edit-inpaint":  # outside the top-left cell the latent is the input's, bit for bit
        from app.models.editing import blend_mask as _blend_mask
        from nodes.mask import GridCellMask

        mask = _blend_mask(GridCellMask("top left", 4, 128, 128), source.samples)[0, 0]
        keep = mask == 0
        assert keep.float().mean() > 0.7
        assert torch.equal(edited.samples[..., keep], source.samples[..., keep])
        assert not torch.equal(edited.samples[..., ~keep], source.samples[..., ~keep])


@pytest.mark.skipif(not (paths.BUNDLED_MODELS / "shapes-dit" / "ditgraph.json").is_file(),
                    reason="bundled shapes-dit weights not present")
def test_inpaint_graph_edits_the_cell_on_the_bundled_model(tmp_path):
    from training import evaluate, world

    document = json.loads((GRAPHS[0].parent / "edit-inpaint.json").read_text())
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(document, targets=["6", "20"]).raise_for_status()
    source = (result.output("6")[0].numpy() * 255).round().astype(np.uint8)
    edited = (result.output("20")[0].numpy() * 255).round().astype(np.uint8)
    target = document["nodes"]["9"]["inputs"]["text"]
    score = evaluate.edit_score(source, edited, target, 0)
    assert score["changed"] and score["psnr_outside"] >= 28, score
    assert world.parse_caption(target).objects[0].colour == world.COLOUR_NAMES.index("green")


def test_cancelling_an_inversion_mid_way_leaves_the_cache_consistent(engine):
    import threading

    document = _tiny(json.loads((GRAPHS[0].parent / "edit-rf-solver.json").read_text()))
    document["nodes"]["10"]["inputs"]["seed"] = 12345  # a fresh cache key for node 10 and after
    cancel = threading.Event()

    def on_event(event):
        if event.get("type") == "progress" and event.get("node") == "10" and event.get("step") == 1:
            cancel.set()

    result = engine.run(document, targets=["11"], cancel=cancel, on_event=on_event)
    assert result.status == "cancelled" and "10" not in result.executed
    finished = engine.run(document, targets=["11"]).raise_for_status()
    assert "10" in finished.executed and torch.isfinite(finished.output("11").samples).all()
