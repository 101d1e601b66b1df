"""ComfyUI's HiDream-I1 workflows (the official Dev template, API format) import: the four text
encoder files of QuadrupleCLIPLoader merge into one TEXT_ENCODER, the lcm sampler and the Dev
shift carry over, only the model files this machine lacks are reported, and the export gives
ComfyUI's nodes back."""

from __future__ import annotations

import pytest

from app.core.workflow import Workflow, errors, validate
from app.fronts.cli import make_registry
from app.fronts.comfy import convert, export_comfy

FILES = ("clip_l_hidream.safetensors", "clip_g_hidream.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors",
         "llama_3.1_8b_instruct_fp8_scaled.safetensors")
HIDREAM_DEV = {
    "54": {"class_type": "QuadrupleCLIPLoader", "inputs": {f"clip_name{i}": f for i, f in enumerate(FILES, 1)}},
    "55": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    "69": {"class_type": "UNETLoader", "inputs": {"unet_name": "hidream_i1_dev_fp8.safetensors", "weight_dtype": "default"}},
    "70": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["69", 0], "shift": 6.0}},
    "16": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox in the snow", "clip": ["54", 0]}},
    "40": {"class_type": "CLIPTextEncode", "inputs": {"text": "bad ugly jpeg artifacts", "clip": ["54", 0]}},
    "53": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 28, "cfg": 1.0, "sampler_name": "lcm", "scheduler": "normal",
                                               "denoise": 1.0, "model": ["70", 0], "positive": ["16", 0],
                                               "negative": ["40", 0], "latent_image": ["53", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["55", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
}


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def test_hidream_dev_template_imports(registry):
    document = convert(HIDREAM_DEV, registry)
    nodes = document["nodes"]
    assert nodes["54"] == {"type": "CombineTextEncoders", "inputs": {
        slot: {"from": [f"54.{i}", "text_encoder"]} for i, slot in enumerate(("first", "second", "third", "fourth"), 1)}}
    assert [nodes[f"54.{i}"]["inputs"]["text_encoder"] for i in range(1, 5)] == list(FILES)
    sampler = nodes["3"]["inputs"]
    assert (sampler["sampler"], sampler["scheduler"], sampler["shift"]) == ("lcm", "auto", 6.0)
    assert nodes["69"] == {"type": "CheckpointLoader", "inputs": {"checkpoint": "hidream_i1_dev_fp8.safetensors"}}
    problems = errors(validate(Workflow.from_dict(document), registry))
    assert {(p.node, p.input) for p in problems} == {("69", "checkpoint"), ("55", "vae"),
                                                     *((f"54.{i}", "text_encoder") for i in range(1, 5))}


def test_hidream_round_trips_through_the_api_format(registry):
    document = convert(HIDREAM_DEV, registry)
    exported = export_comfy(document)
    (loader,) = [n for n in exported.values() if n["class_type"] == "QuadrupleCLIPLoader"]
    assert [loader["inputs"][f"clip_name{i}"] for i in range(1, 5)] == list(FILES)
    strip = lambda d: {k: {"type": v["type"], "inputs": v["inputs"]} for k, v in d["nodes"].items()}  # noqa: E731
    assert strip(convert(exported, registry)) == strip(document)
