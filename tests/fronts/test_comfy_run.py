"""An imported ComfyUI workflow runs, and gives what the same graph built in ditgraph gives."""

from __future__ import annotations

import torch

from app.core.workflow import Workflow, errors, validate
from app.fronts.cli import make_registry
from app.fronts.comfy import convert
from tests.fixtures.comfy_graphs import ui_graph, ui_node
from tests.fixtures.shapes import PROMPT, engine, models_root, shared_cache, txt2img  # noqa: F401, F811 (pytest fixtures)


def comfy_custom_sampler(seed: int, steps: int, cfg: float) -> dict:
    """tiny-shapes through ComfyUI's custom-sampler group, as the editor saves it."""
    nodes = [
        ui_node(1, "CheckpointLoaderSimple", ["tiny-shapes"], outputs=["MODEL", "CLIP", "VAE"]),
        ui_node(2, "CLIPTextEncode", [PROMPT], [("clip", "CLIP", 1)], ["CONDITIONING"]),
        ui_node(3, "CLIPTextEncode", [""], [("clip", "CLIP", 2)], ["CONDITIONING"]),
        ui_node(4, "EmptySD3LatentImage", [32, 32, 1], outputs=["LATENT"]),
        ui_node(5, "RandomNoise", [seed, "fixed"], outputs=["NOISE"]),
        ui_node(6, "CFGGuider", [cfg], [("model", "MODEL", 3), ("positive", "CONDITIONING", 4),
                                        ("negative", "CONDITIONING", 5)], ["GUIDER"]),
        ui_node(7, "KSamplerSelect", ["euler"], outputs=["SAMPLER"]),
        ui_node(8, "BasicScheduler", ["simple", steps, 1.0], [("model", "MODEL", 6)], ["SIGMAS"]),
        ui_node(9, "SamplerCustomAdvanced", [], [("noise", "NOISE", 7), ("guider", "GUIDER", 8), ("sampler", "SAMPLER", 9),
                                                ("sigmas", "SIGMAS", 10), ("latent_image", "LATENT", 11)],
                ["LATENT", "LATENT"]),
        ui_node(10, "VAEDecode", [], [("samples", "LATENT", 12), ("vae", "VAE", 13)], ["IMAGE"]),
        ui_node(11, "SaveImage", ["imported"], [("images", "IMAGE", 14)]),
    ]
    links = [(1, 1, 1, 2, 0, "CLIP"), (2, 1, 1, 3, 0, "CLIP"), (3, 1, 0, 6, 0, "MODEL"), (4, 2, 0, 6, 1, "CONDITIONING"),
             (5, 3, 0, 6, 2, "CONDITIONING"), (6, 1, 0, 8, 0, "MODEL"), (7, 5, 0, 9, 0, "NOISE"), (8, 6, 0, 9, 1, "GUIDER"),
             (9, 7, 0, 9, 2, "SAMPLER"), (10, 8, 0, 9, 3, "SIGMAS"), (11, 4, 0, 9, 4, "LATENT"), (12, 9, 0, 10, 0, "LATENT"),
             (13, 1, 2, 10, 1, "VAE"), (14, 10, 0, 11, 0, "IMAGE")]
    return ui_graph(nodes, links)


def test_imported_custom_sampler_graph_runs_like_the_native_one(engine):  # noqa: F811
    registry = make_registry()
    document = convert(comfy_custom_sampler(seed=7, steps=2, cfg=4.0), registry)
    assert errors(validate(Workflow.from_dict(document), registry)) == []
    imported = engine.run(document, targets=["9"]).raise_for_status().output("9").samples
    native = engine.run(txt2img(steps=2, seed=7, cfg=4.0), targets=["sample"]).raise_for_status().output("sample").samples
    assert imported.shape == native.shape and torch.allclose(imported, native, atol=1e-5)
    other = convert(comfy_custom_sampler(seed=8, steps=2, cfg=4.0), registry)
    assert not torch.allclose(engine.run(other, targets=["9"]).raise_for_status().output("9").samples, native)
    saved = engine.run(document).raise_for_status().ui["11"]["images"]
    assert len(saved) == 1
