"""Importing ComfyUI's Qwen-Image-Edit workflows: the edit text encoders become TextEncodeImageEdit
with the mode of their type, the family is Qwen-Image (its reference-method nodes dissolve), the
sampler keeps the flow shift set before CFGNorm, the round trip is stable, and an imported edit
graph runs like the native one."""

from __future__ import annotations

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from app.fronts.cli import make_registry
from app.fronts.comfy import convert, families
from app.fronts.comfy.export import export_comfy
from tests.fixtures.new_families import save_qwen_edit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# ComfyUI's Qwen-Image-Edit-2511 template in API format (Edit-Plus, two images, the 2511 extras)
QWEN_EDIT_API = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "qwen_image_edit_2511_bf16.safetensors", "weight_dtype": "default"}},
    "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_2.5_vl_7b.safetensors", "type": "qwen_image", "device": "default"}},
    "3": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
    "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.1}},
    "5": {"class_type": "CFGNorm", "inputs": {"model": ["4", 0], "strength": 1.0}},
    "6": {"class_type": "LoadImage", "inputs": {"image": "sofa.png"}},
    "7": {"class_type": "LoadImage", "inputs": {"image": "fur.png"}},
    "8": {"class_type": "FluxKontextImageScale", "inputs": {"image": ["6", 0]}},
    "9": {"class_type": "TextEncodeQwenImageEditPlus", "inputs": {"clip": ["2", 0], "vae": ["3", 0], "image1": ["8", 0],
                                                                 "image2": ["7", 0], "prompt": "make the sofa furry"}},
    "10": {"class_type": "TextEncodeQwenImageEditPlus", "inputs": {"clip": ["2", 0], "vae": ["3", 0], "image1": ["8", 0],
                                                                  "image2": ["7", 0], "prompt": ""}},
    "11": {"class_type": "FluxKontextMultiReferenceLatentMethod", "inputs": {"conditioning": ["9", 0],
                                                                            "reference_latents_method": "index_timestep_zero"}},
    "12": {"class_type": "FluxKontextMultiReferenceLatentMethod", "inputs": {"conditioning": ["10", 0],
                                                                            "reference_latents_method": "index_timestep_zero"}},
    "13": {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["3", 0]}},
    "14": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 40, "cfg": 4.0, "sampler_name": "euler",
                                                "scheduler": "simple", "denoise": 1.0, "model": ["5", 0],
                                                "positive": ["11", 0], "negative": ["12", 0], "latent_image": ["13", 0]}},
    "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["3", 0]}},
    "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "edit"}},
}


def test_qwen_edit_template_imports_onto_text_encode_image_edit():
    assert list(families.check(QWEN_EDIT_API)) == ["qwen-image"]  # no Flux Kontext for its reference-method nodes
    converted = convert(QWEN_EDIT_API, make_registry())
    nodes = converted["nodes"]
    assert nodes["9"] == {"type": "TextEncodeImageEdit", "inputs": {
        "text_encoder": {"from": ["2", "text_encoder"]}, "vae": {"from": ["3", "vae"]}, "image": {"from": ["8", "image"]},
        "image2": {"from": ["7", "image"]}, "text": "make the sofa furry", "mode": "edit-plus"}}
    assert nodes["14"]["inputs"]["positive"] == {"from": ["9", "conditioning"]}  # the method node dissolved
    assert nodes["14"]["inputs"]["model"] == {"from": ["5", "model"]}  # CFGNorm
    assert nodes["14"]["inputs"]["shift"] == 3.1  # ModelSamplingAuraFlow's, through CFGNorm
    assert not {"4", "11", "12"} & set(nodes)
    again = convert(export_comfy(converted), make_registry())["nodes"]
    assert again == nodes  # import -> export -> import
    single = {**QWEN_EDIT_API, "9": {"class_type": "TextEncodeQwenImageEdit", "inputs": {
        "clip": ["2", 0], "vae": ["3", 0], "image": ["8", 0], "prompt": "make it furry"}}}
    exported = export_comfy(convert(single, make_registry()))
    assert exported["9"]["class_type"] == "TextEncodeQwenImageEdit" and "mode" not in exported["9"]["inputs"]
    assert convert(exported, make_registry())["nodes"]["9"]["inputs"]["mode"] == "edit"


def test_imported_edit_graph_runs_like_the_native_one(tmp_path, monkeypatch):
    from PIL import Image

    from app.models.families import qwen_image

    save_qwen_edit(tmp_path / "models" / "checkpoints" / "tiny-qwen-edit", "QwenImageEditPlusPipeline")
    (tmp_path / "input").mkdir()
    pixels = torch.Generator().manual_seed(5)
    for name, (h, w) in {"sofa.png": (40, 56), "fur.png": (32, 32)}.items():
        Image.fromarray((torch.rand(h, w, 3, generator=pixels) * 255).byte().numpy()).save(tmp_path / "input" / name)
    monkeypatch.setitem(paths._overrides, "models", tmp_path / "models")
    monkeypatch.setitem(paths._overrides, "inputs", tmp_path / "input")
    monkeypatch.setattr(qwen_image, "VAE_AREA", 64 * 64)  # tiny model, small images
    monkeypatch.setattr(qwen_image, "VL_AREA", 32 * 32)
    document = {k: v for k, v in QWEN_EDIT_API.items() if k not in ("2", "3")}
    document["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-qwen-edit"}}
    for node_id, raw in document.items():
        raw = document[node_id] = {**raw, "inputs": dict(raw["inputs"])}
        for name, value in raw["inputs"].items():
            if value in (["2", 0], ["3", 0]):
                raw["inputs"][name] = ["1", 1 if value[0] == "2" else 2]
    document["8"] = {"class_type": "ImageScaleToTotalPixels", "inputs": {
        "image": ["6", 0], "upscale_method": "bicubic", "megapixels": 0.01, "resolution_steps": 16}}
    document["14"]["inputs"].update(steps=2)
    engine = Engine(device="cpu", output_dir=tmp_path / "out")
    imported = engine.run(convert(document, make_registry()), targets=["15"]).raise_for_status().output("15")
    native = convert(document, make_registry())
    for node_id in ("9", "10"):  # the same graph written natively, mode spelled out
        native["nodes"][node_id]["inputs"]["mode"] = "edit-plus"
    assert imported.shape == (1, 80, 128, 3) and torch.isfinite(imported).all()
    assert torch.equal(engine.run(native, targets=["15"]).raise_for_status().output("15"), imported)
