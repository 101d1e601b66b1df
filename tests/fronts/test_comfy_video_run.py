"""Imported ComfyUI Wan / LTX-Video workflows run on tiny models like the same graphs built in ditgraph."""

from __future__ import annotations

import pytest
import torch

from app.fronts.cli import make_registry
from app.fronts.comfy import convert
from tests.fixtures.comfy_graphs import ltx_text_to_video, wan22_two_experts
from tests.fixtures.parity import engine  # noqa: F401, F811 (pytest fixture over this module's models_root)
from tests.fixtures.tiny_video import SIZES, save_video_family, workflow


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("wan", "ltx"):
        save_video_family(family, root / "checkpoints" / f"tiny-{family}")
    return root


def _native(family: str, seed: int, steps: int, cfg: float) -> dict:
    document = workflow(family)
    document["nodes"]["sample"]["inputs"].update(seed=seed, steps=steps, cfg=cfg)
    return document


def _sized(api: dict, node: str, family: str) -> None:
    width, height, frames = SIZES[family]
    api[node]["inputs"].update(width=width, height=height, length=frames)


def test_imported_two_expert_wan_workflow_runs_like_one_sampler(engine):  # noqa: F811
    """Both experts the same tiny Wan, split at step 1 of 2: the same latent as one 2-step Sampler."""
    api = wan22_two_experts()
    for loader in ("1", "2"):
        api[loader] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-wan"}}
    api["5"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-wan"}}
    api["6"]["inputs"]["clip"] = api["7"]["inputs"]["clip"] = ["5", 1]
    api["6"]["inputs"]["text"], api["7"]["inputs"]["text"] = workflow("wan")["nodes"]["pos"]["inputs"]["text"], \
        workflow("wan")["nodes"]["neg"]["inputs"]["text"]
    api["11"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-wan"}}
    api["12"]["inputs"]["vae"] = ["11", 2]
    for model in ("3", "4"):
        del api[model]  # no extra shift: the native graph uses the family's default
    api["9"]["inputs"].update(model=["1", 0], end_at_step=1, cfg=4.0, noise_seed=1234)
    api["10"]["inputs"].update(model=["2", 0], start_at_step=1, cfg=4.0)
    api["20"]["inputs"]["value"] = 2
    _sized(api, "8", "wan")
    document = convert(api, make_registry())
    imported = engine.run(document, targets=["10"]).raise_for_status().output("10").samples
    native = engine.run(_native("wan", 1234, 2, 4.0), targets=["sample"]).raise_for_status().output("sample").samples
    assert imported.shape == native.shape and torch.allclose(imported, native, atol=1e-5)
    assert engine.run(document).raise_for_status().ui["14"]["videos"][0]["format"] == "mp4"


def test_imported_ltx_workflow_runs_like_the_native_one(engine):  # noqa: F811
    api = ltx_text_to_video()
    api["1"]["inputs"]["ckpt_name"] = "tiny-ltx"
    api["2"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-ltx"}}
    api["3"]["inputs"]["clip"] = api["4"]["inputs"]["clip"] = ["2", 1]
    api["3"]["inputs"]["text"], api["4"]["inputs"]["text"] = workflow("ltx")["nodes"]["pos"]["inputs"]["text"], \
        workflow("ltx")["nodes"]["neg"]["inputs"]["text"]
    api["5"]["inputs"]["frame_rate"] = 25  # the family's default, as the native graph
    api["7"]["inputs"]["steps"] = 2
    api["9"]["inputs"].update(noise_seed=1234, cfg=4.0)
    _sized(api, "6", "ltx")
    document = convert(api, make_registry())
    imported = engine.run(document, targets=["9"]).raise_for_status().output("9").samples
    native = engine.run(_native("ltx", 1234, 2, 4.0), targets=["sample"]).raise_for_status().output("sample").samples
    assert imported.shape == native.shape and torch.allclose(imported, native, atol=1e-5)
