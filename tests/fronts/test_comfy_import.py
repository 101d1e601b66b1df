"""Importing ComfyUI API-format workflows (the editor format: test_comfy_ui.py)."""

from __future__ import annotations

import json

import pytest

import nodes.core
from app.core.executor import Engine
from app.core.memo import MemoCache
from app.core.registry import Registry
from app.core.workflow import Workflow, errors, validate
from app.fronts.cli import main, make_registry
from app.fronts.comfy import TABLE, ComfyImportError, convert

# What ComfyUI's "Export (API)" writes for a graph of primitives feeding a preview.
COMFY_PRIMITIVES = {
    "1": {"class_type": "PrimitiveInt", "inputs": {"value": 40}, "_meta": {"title": "Width"}},
    "2": {"class_type": "PrimitiveInt", "inputs": {"value": 2}},
    "3": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a red\ncircle"}},
    "4": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    "6": {"class_type": "PrimitiveBoolean", "inputs": {"value": True}},
    "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
}

# ComfyUI's default text-to-image graph, exported in API format (with an SD3.5 checkpoint: the
# default's SD1.5 one is refused as a family ditgraph cannot run).
COMFY_TXT2IMG = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0],
                                               "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


@pytest.fixture
def core_registry():
    registry = Registry()
    registry.add_module(nodes.core)
    return registry


def test_primitives_import_and_run(core_registry):
    document = convert(COMFY_PRIMITIVES, core_registry, name="prims")
    assert document["format"] == "ditgraph/workflow" and document["meta"]["imported_from"] == "comfyui"
    assert document["nodes"]["4"] == {"type": "PreviewAny", "inputs": {"value": {"from": ["1", "value"]}}}
    assert document["nodes"]["1"]["title"] == "Width" and document["nodes"]["3"]["type"] == "PrimitiveString"
    assert set(document["layout"]["nodes"]) == set(COMFY_PRIMITIVES)
    workflow = Workflow.from_dict(document)
    assert not errors(validate(workflow, core_registry))
    result = Engine(core_registry, MemoCache(max_device_bytes=0), device="cpu").run(workflow).raise_for_status()
    assert result.ui["4"]["text"] == ["40"] and result.ui["5"]["text"] == ["'a red\\ncircle'"]
    assert result.ui["7"]["text"] == ["True"]


def test_prompt_wrapper_is_accepted(core_registry):
    assert convert({"prompt": COMFY_PRIMITIVES, "client_id": "x"}, core_registry)["nodes"].keys() == COMFY_PRIMITIVES.keys()


def test_unmapped_types_are_all_listed(core_registry):
    document = dict(COMFY_PRIMITIVES)
    document["8"] = {"class_type": "ImpactWildcardProcessor", "inputs": {}}
    document["9"] = {"class_type": "UltimateSDUpscale", "inputs": {}}
    document["10"] = {"class_type": "UltimateSDUpscale", "inputs": {}}
    with pytest.raises(ComfyImportError) as caught:
        convert(document, core_registry)
    assert caught.value.unmapped == ["ImpactWildcardProcessor", "UltimateSDUpscale"]
    assert "node 10, 9" in str(caught.value)


def test_mapped_type_without_installed_node_is_unmapped(core_registry):
    with pytest.raises(ComfyImportError) as caught:
        convert(COMFY_TXT2IMG, core_registry)
    assert "KSampler" in caught.value.unmapped and "CheckpointLoaderSimple" in caught.value.unmapped


def test_refuses_other_formats(core_registry):
    ui_format = {"last_node_id": 9, "nodes": [{"id": 1, "type": "KSampler"}], "links": []}
    with pytest.raises(ComfyImportError, match="KSampler"):  # the editor format is read; KSampler is not installed
        convert(ui_format, core_registry)
    with pytest.raises(ComfyImportError, match="already a ditgraph"):
        convert({"format": "ditgraph/workflow", "version": 1, "nodes": {}}, core_registry)
    with pytest.raises(ComfyImportError):
        convert([1, 2], core_registry)
    bad_link = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 1}},
                "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}}
    with pytest.raises(ComfyImportError, match="output 3"):
        convert(bad_link, core_registry)
    dangling = {"2": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}}}
    with pytest.raises(ComfyImportError, match="does not exist"):
        convert(dangling, core_registry)


def test_every_table_entry_names_a_real_input_and_output():
    """Each mapping targets inputs/outputs the installed ditgraph node really has."""
    registry = make_registry()
    for comfy_type, mapping in TABLE.items():
        nd = registry.get(mapping.target)
        if nd is None:
            continue  # that node family is not installed here
        for ours in mapping.inputs.values():
            assert ours in nd.inputs, (comfy_type, ours)
        # "!why": an output ours lacks; ".N/name": output name of the extra node <id>.N (same type here)
        outputs = {o.split("/", 1)[-1] for o in mapping.outputs if not o.startswith("!")}
        assert outputs <= {o.name for o in nd.outputs}, comfy_type
        if mapping.expand is None:  # each widget lands on an input of ours, or is dropped on purpose
            for widget in mapping.widgets:
                ours = mapping.inputs.get(widget, widget)
                assert widget.startswith("$") or widget in mapping.drop or ours in nd.inputs, (comfy_type, widget)
        for extra in mapping.creates:
            assert registry.get(extra) is not None, (comfy_type, extra)


def test_default_txt2img_graph_maps_onto_the_diffusion_nodes(tmp_path):
    registry = make_registry()
    needed = {"Sampler", "CheckpointLoader", "EmptyLatent", "TextEncode", "VAEDecode", "SaveImage"}
    if not needed <= set(registry.nodes):
        pytest.skip("diffusion nodes not installed")
    document = convert(COMFY_TXT2IMG, registry)
    nodes_ = document["nodes"]
    assert nodes_["3"]["type"] == "Sampler" and nodes_["3"]["inputs"]["latent"] == {"from": ["5", "latent"]}
    assert nodes_["3"]["inputs"]["sampler"] == "euler" and nodes_["3"]["inputs"]["scheduler"] == "auto"
    assert nodes_["4"]["inputs"] == {"checkpoint": "sd3.5_medium.safetensors"}
    assert nodes_["5"]["inputs"]["model"] == {"from": ["4", "model"]} and nodes_["5"]["inputs"]["vae"] == {"from": ["4", "vae"]}
    assert nodes_["6"]["type"] == "TextEncode"
    if "TextEncodeNegative" in registry.nodes:
        assert nodes_["7"]["type"] == "TextEncodeNegative"
    assert nodes_["8"]["inputs"]["latent"] == {"from": ["3", "latent"]}
    problems = errors(validate(Workflow.from_dict(document), registry))
    # the only thing wrong is the checkpoint file, which this machine does not have
    assert [(p.node, p.input) for p in problems] == [("4", "checkpoint")]


def test_cli_import_then_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DITGRAPH_OUTPUTS", str(tmp_path / "out"))
    source = tmp_path / "api.json"
    source.write_text(json.dumps(COMFY_PRIMITIVES))
    target = tmp_path / "converted.json"
    assert main(["import-comfy", str(source), "-o", str(target)]) == 0
    assert json.loads(target.read_text())["nodes"]["4"]["type"] == "PreviewAny"
    capsys.readouterr()
    assert main(["run", str(target), "--set", "1.value=41"]) == 0
    assert "node 4: 41" in capsys.readouterr().out
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(COMFY_PRIMITIVES))
    Image.new("RGB", (2, 2)).save(tmp_path / "comfy.png", pnginfo=info)
    assert main(["import-comfy", str(tmp_path / "comfy.png"), "-o", str(tmp_path / "from_png.json")]) == 0
    assert json.loads((tmp_path / "from_png.json").read_text())["nodes"]["4"]["type"] == "PreviewAny"
    source.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    assert main(["import-comfy", str(source)]) == 2
    assert "NoSuchNode" in capsys.readouterr().err


def test_lora_loader_clip_output_passes_the_text_encoder_through():
    registry = make_registry()
    if not {"LoraLoader", "TextEncode", "CheckpointLoader"} <= set(registry.nodes):
        pytest.skip("diffusion nodes not installed")
    document = dict(COMFY_TXT2IMG)
    document["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors",
                                                             "strength_model": 0.8, "strength_clip": 1.0}}
    document["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "clip": ["10", 1], "lora_name": "b.safetensors",
                                                             "strength_model": 0.5, "strength_clip": 1.0}}
    document["3"] = {**document["3"], "inputs": {**document["3"]["inputs"], "model": ["11", 0]}}
    document["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["11", 1]}}
    converted = convert(document, registry)
    nodes_ = converted["nodes"]
    assert nodes_["11"]["inputs"] == {"model": {"from": ["10", "model"]}, "lora": "b.safetensors", "strength": 0.5}
    assert nodes_["6"]["inputs"]["text_encoder"] == {"from": ["4", "text_encoder"]}  # through both loaders
    assert nodes_["3"]["inputs"]["model"] == {"from": ["11", "model"]}
    assert any("MODEL only" in note for note in converted["meta"]["import_notes"])


def test_sd3_and_flux_loaders_and_model_sampling():
    registry = make_registry()
    if not {"CombineTextEncoders", "TextEncoderLoader", "CheckpointLoader", "Sampler", "VAELoader"} <= set(registry.nodes):
        pytest.skip("diffusion nodes not installed")
    document = {
        "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl.safetensors", "clip_name2": "clip_l.safetensors",
                                                         "type": "flux"}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "13": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["12", 0], "shift": 3.0}},
        "14": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["13", 0], "lora_name": "x.safetensors",
                                                               "strength_model": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["11", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 1.0, "model": ["14", 0],
                                                   "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux"}},
    }
    converted = convert(document, registry)
    nodes_ = converted["nodes"]
    assert "13" not in nodes_  # ModelSamplingSD3 dissolves into the sampler's shift
    assert nodes_["14"]["inputs"]["model"] == {"from": ["12", "model"]}
    assert nodes_["3"]["inputs"]["shift"] == 3.0 and nodes_["3"]["inputs"]["model"] == {"from": ["14", "model"]}
    assert nodes_["11"] == {"type": "CombineTextEncoders", "inputs": {"first": {"from": ["11.1", "text_encoder"]},
                                                                     "second": {"from": ["11.2", "text_encoder"]}}}
    assert nodes_["11.1"]["inputs"] == {"text_encoder": "t5xxl.safetensors"}
    assert nodes_["5"]["inputs"]["vae"] == {"from": ["10", "vae"]} and nodes_["5"]["inputs"]["model"] == {"from": ["14", "model"]}
    problems = errors(validate(Workflow.from_dict(converted), registry))
    # only the model files this machine lacks
    assert {(p.node, p.input) for p in problems} == {("12", "checkpoint"), ("11.1", "text_encoder"),
                                                     ("11.2", "text_encoder"), ("10", "vae"), ("14", "lora")}


def test_every_table_entry_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "comfy_import.md").read_text()
    rows = {line.split("|")[1].strip() for line in doc.splitlines() if line.startswith("| ")}
    assert set(TABLE) <= rows, sorted(set(TABLE) - rows)
