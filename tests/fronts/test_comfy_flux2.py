"""ComfyUI Flux.2 workflows: a [klein] image-edit workflow as the official templates build it
(UNET/CLIP/VAE loaders, EmptyFlux2LatentImage, Flux2Scheduler, ReferenceLatent on both prompts,
CFGGuider, SamplerCustomAdvanced) imports, round-trips, and runs to diffusers' Flux2KleinPipeline's
image; models that share Flux.2's latents but not its transformer are refused by name. And the
HunyuanDiT text node."""

from __future__ import annotations

import math

import pytest
import torch

from app.core import paths
from app.core.executor import Engine
from app.core.workflow import Workflow, errors, validate
from app.fronts.cli import make_registry
from app.fronts.comfy import ComfyImportError, convert
from app.fronts.comfy.export import export_comfy
from tests.fixtures.flux2_models import tiny_flux2
from tests.fixtures.parity import PROMPT, SEED, SIZE, STEPS, rel_l2
from tests.fixtures.tiny_models import save_parts

CFG = 4.0


def klein_edit(scheduler_size: int) -> dict:
    """The API format of ComfyUI's Flux.2 [klein] edit template (one reference image)."""
    def link(node: str, output: int = 0) -> list:
        return [node, output]

    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny-flux2-klein", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen3-tiny", "type": "flux2", "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "flux2-vae-tiny"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": link("2"), "text": PROMPT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": link("2"), "text": ""}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": link("6"), "vae": link("3")}},
        "8": {"class_type": "ReferenceLatent", "inputs": {"conditioning": link("4"), "latent": link("7")}},
        "9": {"class_type": "ReferenceLatent", "inputs": {"conditioning": link("5"), "latent": link("7")}},
        "10": {"class_type": "CFGGuider", "inputs": {"model": link("1"), "positive": link("8"), "negative": link("9"),
                                                     "cfg": CFG}},
        "11": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "12": {"class_type": "Flux2Scheduler", "inputs": {"steps": STEPS, "width": scheduler_size,
                                                         "height": scheduler_size}},
        "13": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "14": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "15": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": link("14"), "guider": link("10"),
                                                                 "sampler": link("13"), "sigmas": link("12"),
                                                                 "latent_image": link("11")}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": link("15"), "vae": link("3")}},
        "17": {"class_type": "SaveImage", "inputs": {"images": link("16"), "filename_prefix": "klein"}},
    }


@pytest.fixture(scope="module")
def flux2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    parts = tiny_flux2("flux2-klein")
    save_parts(parts, "Flux2KleinPipeline", root / "models" / "checkpoints" / "tiny-flux2-klein")
    parts["text_encoder"].save_pretrained(root / "models" / "text_encoders" / "qwen3-tiny")
    parts["tokenizer"].save_pretrained(root / "models" / "text_encoders" / "qwen3-tiny")
    parts["vae"].save_pretrained(root / "models" / "vae" / "flux2-vae-tiny")
    (root / "input").mkdir()
    from PIL import Image

    pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
    Image.fromarray(pixels).save(root / "input" / "ref.png")
    return root


def test_klein_edit_workflow_imports_round_trips_and_matches_the_pipeline(flux2_root, tmp_path, monkeypatch):
    import diffusers
    from PIL import Image

    monkeypatch.setitem(paths._overrides, "models", flux2_root / "models")
    monkeypatch.setitem(paths._overrides, "inputs", flux2_root / "input")
    registry = make_registry()
    # ComfyUI's Flux2Scheduler counts tokens as width*height/16²; the tiny VAE makes 8x8 tokens of 32 px,
    # which that rule gives for 128 px: the schedule the pipeline computes for its latents
    document = convert(klein_edit(scheduler_size=128), registry)
    assert errors(validate(Workflow.from_dict(document), registry)) == []
    kinds = {node["type"] for node in document["nodes"].values()}
    assert {"EmptyLatent", "Scheduler", "ReferenceLatent", "SamplerCustom"} <= kinds
    again = convert(export_comfy(document), registry)
    assert {k: (v["type"], v["inputs"]) for k, v in again["nodes"].items()} == \
        {k: (v["type"], v["inputs"]) for k, v in document["nodes"].items()}
    result = Engine(device="cpu", output_dir=tmp_path / "out").run(document, targets=["16", "11"]).raise_for_status()
    latent = result.output("11").samples
    assert latent.shape == (1, 16, 8, 8)
    folder = flux2_root / "models" / "checkpoints" / "tiny-flux2-klein"
    pipe = diffusers.Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    from app.models.sampling import make_noise

    with torch.no_grad():
        reference = pipe(prompt=PROMPT, image=[Image.open(flux2_root / "input" / "ref.png")], height=SIZE, width=SIZE,
                         num_inference_steps=STEPS, guidance_scale=CFG, latents=make_noise(tuple(latent.shape), SEED),
                         output_type="pt").images.permute(0, 2, 3, 1)
    error = rel_l2(result.output("16"), reference)
    print(f"imported ComfyUI klein edit workflow vs Flux2KleinPipeline: relative L2 {error:.2e}")
    assert math.isfinite(error) and error <= 1e-4


@pytest.mark.parametrize("unet, family", [
    ("flux3-image-klein-int8-convrot.safetensors", "Flux.3"), ("ernie-image.safetensors", "ERNIE-Image"),
    ("ideogram4_fp8_scaled.safetensors", "Ideogram 4"), ("moss_image_sft_int8_convrot.safetensors", "MOSS-Image"),
])
def test_models_on_flux2_latents_are_refused_by_name(unet, family):
    api = klein_edit(128)
    api["1"]["inputs"]["unet_name"] = unet
    with pytest.raises(ComfyImportError, match=f"^{family} workflow"):
        convert(api, make_registry())


def test_klein_kv_cache_workflow_is_refused_by_name():
    api = klein_edit(128)
    api["1"]["inputs"]["unet_name"] = "flux-2-klein-9b-kv-fp8.safetensors"
    api["20"] = {"class_type": "FluxKVCache", "inputs": {"model": ["1", 0]}}
    api["10"]["inputs"]["model"] = ["20", 0]
    with pytest.raises(ComfyImportError, match=r"^Flux.2 \[klein\] KV"):
        convert(api, make_registry())


def test_hunyuan_dit_text_node_imports():
    """HunyuanDiT: CLIPTextEncodeHunyuanDiT is one TextEncode (the mT5 prompt, noted when BERT's
    differs); ComfyUI's all-in-one checkpoint imports as a CheckpointLoader (it loads with a config folder)."""
    api = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "HunyuanDiT-v1.2-Diffusers", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "bert", "clip_name2": "mt5", "type": "hydit"}},
        "3": {"class_type": "CLIPTextEncodeHunyuanDiT", "inputs": {"clip": ["2", 0], "bert": "a cat", "mt5xl": "a cat, photo"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 30, "cfg": 6.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }
    document = convert(api, make_registry())
    assert document["nodes"]["3"]["type"] == "TextEncode" and document["nodes"]["3"]["inputs"]["text"] == "a cat, photo"
    assert any("mt5xl" in note for note in document["meta"]["import_notes"])
    api["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "hunyuan_dit_1.2.safetensors"}}
    assert convert(api, make_registry())["nodes"]["1"]["inputs"] == {"checkpoint": "hunyuan_dit_1.2.safetensors"}
