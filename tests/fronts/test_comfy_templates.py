"""What the official templates use beyond the basics: Flux.1 Kontext, CFGNorm/FreSca, the resize,
stitch and save utilities, dynamic-combo widgets; capability refusals (a ControlNet or reference
images on a family without them) and models that only look like a runnable family's."""

from __future__ import annotations

import copy

import pytest

from app.fronts.cli import make_registry
from app.fronts.comfy import ComfyImportError, convert, families, to_api
from app.fronts.comfy.export import export_comfy
from tests.fixtures.comfy_graphs import flux_custom_sampler, image_chain, splice, ui_node
from tests.fronts.test_comfy_ui import only_missing_files


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def strip(document: dict) -> dict:
    return {k: {"type": v["type"], "inputs": v["inputs"]} for k, v in document["nodes"].items()}


def same_both_ways(ui: dict, api: dict, registry) -> dict:
    """The editor and API formats give the same nodes, and import -> export -> import is stable."""
    document = convert(ui, registry)
    assert strip(document) == strip(convert(api, registry))
    assert strip(convert(export_comfy(document), registry)) == strip(document)
    assert only_missing_files(document, registry) == []
    return document


IMAGE = {"from": ["1", "image"]}
IMAGE_CASES = [  # ComfyUI type, editor widgets, first input, extra inputs, API inputs, our node 2 (and 2.1)
    ("ImageStitch", ["down", False, 4, "black"], "image1", ("image2",),
     {"direction": "down", "match_image_size": False, "spacing_width": 4, "spacing_color": "black"},
     {"2": {"type": "ImageStitch", "inputs": {"image1": IMAGE, "image2": IMAGE, "direction": "down",
                                              "match_image_size": False, "spacing_width": 4, "spacing_color": "black"}}}),
    ("FluxKontextImageScale", [], "image", (), {}, {"2": {"type": "FluxKontextImageScale", "inputs": {"image": IMAGE}}}),
    ("ImageScaleToMaxDimension", ["lanczos", 768], "image", (), {"upscale_method": "lanczos", "largest_size": 768},
     {"2": {"type": "ScaleToSide", "inputs": {"image": IMAGE, "method": "bicubic", "size": 768}}}),
    ("ResizeImageMaskNode", ["scale dimensions", 640, 360, "center", "lanczos"], "input", (),
     {"resize_type": "scale dimensions", "resize_type.width": 640, "resize_type.height": 360, "resize_type.crop": "center",
      "scale_method": "lanczos"},
     {"2": {"type": "ImageScale", "inputs": {"image": IMAGE, "method": "bicubic", "width": 640, "height": 360,
                                             "crop": "center"}}}),
    ("ResizeImageMaskNode", ["scale longer dimension", 512, "area"], "input", (),
     {"resize_type": "scale longer dimension", "resize_type.longer_size": 512, "scale_method": "area"},
     {"2": {"type": "ScaleToSide", "inputs": {"image": IMAGE, "method": "bilinear", "size": 512}}}),
    ("ResizeImageMaskNode", ["scale shorter dimension", 256, "bicubic"], "input", (),
     {"resize_type": "scale shorter dimension", "resize_type.shorter_size": 256, "scale_method": "bicubic"},
     {"2": {"type": "ScaleToSide", "inputs": {"image": IMAGE, "method": "bicubic", "side": "shorter", "size": 256}}}),
    ("ResizeImageMaskNode", ["scale total pixels", 1, "lanczos"], "input", (),
     {"resize_type": "scale total pixels", "resize_type.megapixels": 1, "scale_method": "lanczos"},
     {"2": {"type": "ScaleToMegapixels", "inputs": {"image": IMAGE, "method": "bicubic", "megapixels": 1}}}),
    ("ResizeImageMaskNode", ["scale by multiplier", 0.5, "nearest-exact"], "input", (),
     {"resize_type": "scale by multiplier", "resize_type.multiplier": 0.5, "scale_method": "nearest-exact"},
     {"2": {"type": "ImageScaleBy", "inputs": {"image": IMAGE, "method": "nearest-exact", "scale_by": 0.5}}}),
    ("ResizeImageMaskNode", ["match size", "center", "bilinear"], "input", ("resize_type.match",),
     {"resize_type": "match size", "resize_type.crop": "center", "scale_method": "bilinear"},
     {"2.1": {"type": "ImageSize", "inputs": {"image": IMAGE}},
      "2": {"type": "ImageScale", "inputs": {"image": IMAGE, "method": "bilinear", "width": {"from": ["2.1", "width"]},
                                             "height": {"from": ["2.1", "height"]}, "crop": "center"}}}),
    ("ImageFromBatch", [2, 3], "image", (), {"batch_index": 2, "length": 3},
     {"2": {"type": "ImageFromBatch", "inputs": {"image": IMAGE, "index": 2, "length": 3}}}),
    ("SaveImageAdvanced", ["out", "png", "8-bit", "sRGB"], "images", (),
     {"filename_prefix": "out", "format": "png", "format.bit_depth": "8-bit", "format.input_color_space": "sRGB"},
     {"2": {"type": "SaveImage", "inputs": {"images": IMAGE, "filename_prefix": "out"}},
      "3": {"type": "PreviewImage", "inputs": {"images": IMAGE}}}),  # its image output passes its input on
]


@pytest.mark.parametrize("kind,widgets,first,extra,named,expected", IMAGE_CASES,
                         ids=[f"{c[0]}-{c[1][0] if c[1] else ''}" for c in IMAGE_CASES])
def test_image_utilities_in_both_formats(kind, widgets, first, extra, named, expected, registry):
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png", "upload": "image"}},
           "2": {"class_type": kind, "inputs": {first: ["1", 0], **{name: ["1", 0] for name in extra}, **named}},
           "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    nodes = same_both_ways(image_chain(kind, widgets, first, extra), api, registry)["nodes"]
    assert {k: nodes[k] for k in expected} == expected


def model_splice(kind: str, widgets: list) -> tuple[dict, dict]:
    """``kind`` between the (bypassed LoRA after the) model loader and the guider, in both formats."""
    ui = splice(flux_custom_sampler(), 6, ui_node(60, kind, widgets, [("model", "MODEL", None)], ["MODEL"]))
    api, _, _ = to_api(flux_custom_sampler())
    api["6"]["inputs"]["model"] = ["60", 0]
    return ui, api


@pytest.mark.parametrize("kind,widgets,named,expected", [
    ("CFGNorm", [1.0, False], {"strength": 1.0, "pre_cfg": False}, {"type": "CFGNorm", "inputs": {"strength": 1.0, "pre_cfg": False}}),
    ("CFGNorm", [0.8], {"strength": 0.8}, {"type": "CFGNorm", "inputs": {"strength": 0.8}}),  # before pre_cfg existed
    ("FreSca", [1.0, 2.5, 30], {"scale_low": 1.0, "scale_high": 2.5, "freq_cutoff": 30},
     {"type": "FreSca", "inputs": {"scale_low": 1.0, "scale_high": 2.5, "freq_cutoff": 30}}),
])
def test_guidance_patches_in_both_formats(kind, widgets, named, expected, registry):
    ui, api = model_splice(kind, widgets)
    api["60"] = {"class_type": kind, "inputs": {"model": ["1", 0], **named}}
    nodes = same_both_ways(ui, api, registry)["nodes"]
    assert nodes["60"] == {"type": expected["type"], "inputs": {"model": {"from": ["1", "model"]}, **expected["inputs"]}}
    assert nodes["11"]["inputs"]["model"] == {"from": ["60", "model"]}


def test_model_attention_backend_becomes_auto(registry):
    ui, api = model_splice("ModelAttentionBackend", ["comfy kitchen attention"])
    api["60"] = {"class_type": "ModelAttentionBackend", "inputs": {"model": ["1", 0], "attention": "comfy kitchen attention"}}
    document = convert(ui, registry)
    assert strip(document) == strip(convert(api, registry))
    assert document["nodes"]["60"] == {"type": "AttentionBackend", "inputs": {"model": {"from": ["1", "model"]}, "backend": "auto"}}
    assert any("'comfy kitchen attention'" in note for note in document["meta"]["import_notes"])


def test_t5_tokenizer_options_dissolve(registry):
    ui = splice(flux_custom_sampler(), 3, ui_node(61, "T5TokenizerOptions", [1, 0], [("clip", "CLIP", None)], ["CLIP"]))
    api, _, _ = to_api(flux_custom_sampler())
    api["61"] = {"class_type": "T5TokenizerOptions", "inputs": {"clip": ["2", 0], "min_padding": 1, "min_length": 0}}
    api["4"]["inputs"]["clip"] = ["61", 0]
    document = same_both_ways(ui, api, registry)
    assert "61" not in document["nodes"] and document["nodes"]["4"]["inputs"]["text_encoder"] == {"from": ["2", "text_encoder"]}
    assert any("T5TokenizerOptions" in note for note in document["meta"]["import_notes"])


def test_resolution_selector_sizes_the_latent(registry):
    ui = flux_custom_sampler()
    selector = next(n for n in ui["nodes"] if n["id"] == 15)
    selector.update(type="ResolutionSelector", widgets_values=["16:9 (Widescreen)", 1.0, 16], outputs=[
        {"name": "width", "type": "INT", "links": [13]}, {"name": "height", "type": "INT", "links": [30]}])
    latent = next(n for n in ui["nodes"] if n["id"] == 10)
    latent["inputs"].append({"name": "height", "type": "INT", "link": 30, "widget": {"name": "height"}})
    ui["links"].append([30, 15, 1, 10, 1, "INT"])
    api, _, _ = to_api(flux_custom_sampler())
    api["15"] = {"class_type": "ResolutionSelector", "inputs": {"aspect_ratio": "16:9 (Widescreen)", "megapixels": 1.0,
                                                                 "multiple": 16}}
    api["10"]["inputs"].update(width=["15", 0], height=["15", 1])
    nodes = same_both_ways(ui, api, registry)["nodes"]
    assert nodes["15"] == {"type": "ResolutionSelector", "inputs": {"aspect_ratio": "16:9 (Widescreen)", "megapixels": 1.0,
                                                                    "multiple": 16}}
    assert nodes["10"]["inputs"]["height"] == {"from": ["15", "height"]}


def kontext() -> tuple[dict, dict]:
    """The Flux.1 Kontext example: the input image, scaled to a Kontext size and encoded, rides on
    the conditioning (ReferenceLatent); ComfyUI's reference method node is the default 'offset'."""
    ui = flux_custom_sampler()
    next(n for n in ui["nodes"] if n["id"] == 1)["widgets_values"][0] = "flux1-kontext-dev.safetensors"
    ui["nodes"] += [
        ui_node(20, "LoadImage", ["girl.png", "image"], outputs=["IMAGE", "MASK"]),
        ui_node(21, "FluxKontextImageScale", [], [("image", "IMAGE", 20)], ["IMAGE"]),
        ui_node(22, "VAEEncode", [], [("pixels", "IMAGE", 21), ("vae", "VAE", 22)], ["LATENT"]),
        ui_node(23, "ReferenceLatent", [], [("conditioning", "CONDITIONING", 23), ("latent", "LATENT", 24)], ["CONDITIONING"]),
        ui_node(24, "FluxKontextMultiReferenceLatentMethod", ["offset"], [("conditioning", "CONDITIONING", 25)], ["CONDITIONING"]),
    ]
    ui["links"] = [li for li in ui["links"] if li[0] != 5] + [
        [20, 20, 0, 21, 0, "IMAGE"], [21, 21, 0, 22, 0, "IMAGE"], [22, 3, 0, 22, 1, "VAE"], [23, 5, 0, 23, 0, "CONDITIONING"],
        [24, 22, 0, 23, 1, "LATENT"], [25, 23, 0, 24, 0, "CONDITIONING"], [5, 24, 0, 6, 1, "CONDITIONING"]]
    api, _, _ = to_api(copy.deepcopy(ui))
    api.update({
        "21": {"class_type": "FluxKontextImageScale", "inputs": {"image": ["20", 0]}},
        "23": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["5", 0], "latent": ["22", 0]}},
        "24": {"class_type": "FluxKontextMultiReferenceLatentMethod", "inputs": {"conditioning": ["23", 0],
                                                                                 "reference_latents_method": "offset"}}})
    return ui, api


def test_flux_kontext_imports_and_runs_as_flux(registry):
    assert families.runnable("flux-kontext") and not families.runnable("flux-fill")
    ui, api = kontext()
    assert list(families.detect(api)) == ["flux-kontext"]
    document = same_both_ways(ui, api, registry)
    nodes = document["nodes"]
    assert nodes["23"] == {"type": "ReferenceLatent", "inputs": {"conditioning": {"from": ["5", "conditioning"]},
                                                                 "latent": {"from": ["22", "latent"]}}}
    assert "24" not in nodes and nodes["11"]["inputs"]["positive"] == {"from": ["23", "conditioning"]}
    assert nodes["21"] == {"type": "FluxKontextImageScale", "inputs": {"image": {"from": ["20", "image"]}}}


def _unet(api: dict, name: str = "qwen_image_fp8_e4m3fn.safetensors") -> dict:
    api["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    return api


@pytest.mark.parametrize("unet,extra,message", [
    ("qwen_image_fp8_e4m3fn.safetensors", {"42": {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["5", 0], "negative": ["5", 0], "control_net": ["40", 0], "image": ["41", 0], "vae": ["3", 0],
        "strength": 0.7, "start_percent": 0.0, "end_percent": 0.8}},
      "40": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "union.safetensors"}},
      "41": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}},
     "Qwen-Image workflow needs a ControlNet (node 42, ControlNetApplyAdvanced): ditgraph's Qwen-Image has no support"),
    ("sd3.5_medium.safetensors", {"43": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["5", 0]}}},
     "SD3/3.5 workflow needs reference images (in-context editing) (node 43, ReferenceLatent)"),
])
def test_a_node_needing_a_capability_the_family_lacks_is_refused_in_one_line(unet, extra, message, registry):
    api, _, _ = to_api(flux_custom_sampler())
    api = _unet({**api, **extra}, unet)
    with pytest.raises(ComfyImportError) as caught:
        convert(api, registry)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.parametrize("node,inputs,family", [
    ("1", {"unet_name": "qwen_image_2.1_int8_convrot.safetensors"}, "Qwen-Image 2.1"),
    ("1", {"unet_name": "qwen_image_layered_bf16.safetensors"}, "Qwen-Image-Layered"),
    ("1", {"unet_name": "chroma-radiance-x0.safetensors"}, "Chroma Radiance"),
    ("1", {"unet_name": "krea2_turbo_fp8_scaled.safetensors"}, "Krea 2"),
    ("3", {"vae_name": "marigold_v2_depth_vae.safetensors"}, "Marigold v2"),
])
def test_models_that_look_like_a_runnable_family_are_refused(node, inputs, family, registry):
    api, _, _ = to_api(flux_custom_sampler())
    api[node]["inputs"].update(inputs)
    with pytest.raises(ComfyImportError, match=f"^{family}.* workflow \\(from its .*ditgraph runs"):
        convert(api, registry)


def test_resize_and_save_refusals_and_notes(registry):
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
           "2": {"class_type": "ResizeImageMaskNode", "inputs": {"input": ["1", 0], "resize_type": "scale to multiple",
                                                                 "resize_type.multiple": 64, "scale_method": "area"}}}
    with pytest.raises(ComfyImportError, match="node 2 \\(ResizeImageMaskNode\\): resize_type 'scale to multiple' has no"):
        convert(api, registry)
    api["2"] = {"class_type": "SaveImageAdvanced", "inputs": {"images": ["1", 0], "filename_prefix": "x", "format": "exr",
                                                              "format.bit_depth": "32-bit float"}}
    document = convert(api, registry)
    assert document["nodes"]["2"] == {"type": "SaveImage", "inputs": {"images": {"from": ["1", "image"]}, "filename_prefix": "x"}}
    assert any("8-bit PNG (ComfyUI would write exr, 32-bit float)" in n for n in document["meta"]["import_notes"])


def test_dynamic_combo_widgets_follow_their_option(registry):
    """An editor-format ResizeImageMaskNode's values after resize_type depend on which type it is."""
    for widgets, expected in ((["scale longer dimension", 300, "bicubic"], {"size": 300, "method": "bicubic"}),
                              (["scale width", 200, "bilinear"], {"width": 200, "height": 0, "method": "bilinear"})):
        nodes = convert(image_chain("ResizeImageMaskNode", widgets, "input"), registry)["nodes"]
        assert {k: nodes["2"]["inputs"][k] for k in expected} == expected
