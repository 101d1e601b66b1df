"""Importing ComfyUI editor-format workflows: widgets by position, reroutes, primitives, bypass,
subgraphs, group nodes, layout; the custom-sampler group; family refusals."""

from __future__ import annotations

import copy

import pytest

from app.core.workflow import Workflow, errors, validate
from app.fronts.cli import make_registry
from app.fronts.comfy import TABLE, ComfyImportError, convert, regroup, to_api
from app.fronts.comfy.regroup import inline
from tests.fixtures.comfy_graphs import as_subgraph, flux_custom_sampler, ui_graph, ui_node

MISSING_FILE = "not found (looked in"


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def only_missing_files(document: dict, registry) -> list[str]:
    """Validation problems other than model files this machine does not have."""
    problems = errors(validate(Workflow.from_dict(document), registry))
    return [str(p) for p in problems if MISSING_FILE not in p.message]


def test_flux_custom_sampler_graph_imports_and_validates(registry):
    document = convert(flux_custom_sampler(), registry, name="flux")
    nodes = document["nodes"]
    # RandomNoise, BasicGuider and KSamplerSelect fold into one SamplerCustom
    assert {"6", "7", "8"}.isdisjoint(nodes)
    assert nodes["11"] == {"type": "SamplerCustom", "inputs": {
        "sigmas": {"from": ["9", "sigmas"]}, "latent": {"from": ["10", "latent"]}, "model": {"from": ["1", "model"]},
        "positive": {"from": ["5", "conditioning"]}, "cfg": 1.0, "seed": 42, "add_noise": True, "sampler": "euler"}}
    # widgets by position; the reroute and the bypassed LoRA are linked past; the primitive's value is pushed in
    # ... and the scheduler gets the image size (Flux's shift depends on it) from the latent the sampler starts from
    assert nodes["9"]["inputs"] == {"scheduler": "auto", "steps": 20, "denoise": 1, "model": {"from": ["1", "model"]},
                                    "width": 768, "height": 1024}
    assert nodes["10"]["inputs"]["width"] == 768 and nodes["10"]["inputs"]["height"] == 1024
    assert {"14", "15", "16", "17"}.isdisjoint(nodes)  # reroute, primitive, bypassed, muted
    assert nodes["4"]["title"] == "Prompt" and nodes["5"]["inputs"]["guidance"] == 3.5
    assert nodes["2"]["type"] == "CombineTextEncoders" and nodes["2.2"]["inputs"] == {"text_encoder": "t5xxl_fp16.safetensors"}
    # the layout keeps positions, sizes, groups and the viewport
    layout = document["layout"]
    assert layout["nodes"]["1"] == {"pos": [100, 50], "size": [300, 100]}
    assert layout["groups"] == [{"title": "Load models", "bounding": [0, 0, 400, 300], "color": "#3f789e", "font_size": 24}]
    assert layout["viewport"] == {"offset": [10, 20], "scale": 0.8} and "pos" in layout["nodes"]["2.1"]
    assert only_missing_files(document, registry) == []


def test_api_and_ui_format_of_the_same_graph_give_the_same_nodes(registry):
    ui = flux_custom_sampler()
    api, _, _ = to_api(ui)
    assert api["10"]["inputs"]["width"] == 768 and api["11"]["inputs"]["guider"] == ["6", 0]
    from_api = convert(api, registry)["nodes"]
    assert from_api == convert(ui, registry)["nodes"]


def test_subgraph_gives_the_same_graph_as_without_it(registry):
    flat = convert(flux_custom_sampler(), registry)
    kept = convert(as_subgraph(flux_custom_sampler(), {4, 5}), registry)
    nested = inline(kept)  # a no-op where the workflow format has no subgraphs
    renamed = {key.replace("50:", ""): value for key, value in nested["nodes"].items()}
    assert set(nested["nodes"]) >= {"50:4", "50:5"} and "50" not in nested["nodes"]
    assert renamed["5"]["inputs"]["conditioning"] == {"from": ["50:4", "conditioning"]}
    assert renamed["11"]["inputs"]["positive"] == {"from": ["50:5", "conditioning"]}
    strip = lambda nodes: {k: {**v, "inputs": {n: x for n, x in v["inputs"].items() if not isinstance(x, dict)}}  # noqa: E731
                           for k, v in nodes.items()}
    assert strip(renamed) == strip(flat["nodes"])
    assert any("subgraph 'Encode' (node 50)" in note for note in kept["meta"]["import_notes"])
    assert only_missing_files(kept, registry) == []


def test_subgraph_becomes_a_ditgraph_subgraph(registry):
    document = convert(as_subgraph(flux_custom_sampler(), {4, 5}), registry)
    assert document["nodes"]["50"] == {"type": f"{regroup.PREFIX}Encode", "title": "Encode",
                                       "inputs": {"text_encoder": {"from": ["2", "text_encoder"]}}}
    definition = document["subgraphs"]["Encode"]
    assert definition["inputs"] == {"text_encoder": {"type": "TEXT_ENCODER"}}
    assert definition["outputs"] == {"conditioning": {"from": ["5", "conditioning"]}}
    assert definition["nodes"]["4"]["inputs"]["text_encoder"] == {"from": [regroup.INPUTS, "text_encoder"]}
    assert document["nodes"]["11"]["inputs"]["positive"] == {"from": ["50", "conditioning"]}
    twice = as_subgraph(flux_custom_sampler(), {4, 5})
    twice["nodes"].append({**copy.deepcopy(next(n for n in twice["nodes"] if n["id"] == 50)), "id": 51, "outputs": []})
    twice["links"].append([3000, 2, 0, 51, 0, "CLIP"])
    assert list(convert(twice, registry)["subgraphs"]) == ["Encode"]  # two identical instances share one definition


def test_subgraph_promoted_widget_value_reaches_the_inner_node(registry):
    document = as_subgraph(flux_custom_sampler(), {4, 5})
    instance = next(n for n in document["nodes"] if n["id"] == 50)
    # an instance input shown as a widget, unconnected outside: its value is pushed into the subgraph
    document["definitions"]["subgraphs"][0]["inputs"].append({"id": "g", "name": "guidance", "type": "FLOAT", "linkIds": [99]})
    document["definitions"]["subgraphs"][0]["links"].append(
        {"id": 99, "origin_id": -10, "origin_slot": 1, "target_id": 5, "target_slot": 1, "type": "FLOAT"})
    inner_guidance = next(n for n in document["definitions"]["subgraphs"][0]["nodes"] if n["id"] == 5)
    inner_guidance["inputs"].append({"name": "guidance", "type": "FLOAT", "link": 99, "widget": {"name": "guidance"}})
    instance["inputs"].append({"name": "guidance", "type": "FLOAT", "link": None, "widget": {"name": "guidance"}})
    instance["widgets_values"] = [2.5]
    assert inline(convert(document, registry))["nodes"]["50:5"]["inputs"]["guidance"] == 2.5


def test_subgraph_values_of_widget_inputs_not_shown_on_the_instance(registry):
    """Newer files: one value per widget-typed definition input, whether the instance shows it or not."""
    document = as_subgraph(flux_custom_sampler(), {4, 5})
    instance = next(n for n in document["nodes"] if n["id"] == 50)
    definition = document["definitions"]["subgraphs"][0]
    inner_guidance = next(n for n in definition["nodes"] if n["id"] == 5)
    for slot, name in ((1, "hidden"), (2, "guidance")):
        definition["inputs"].append({"id": name, "name": name, "type": "FLOAT", "linkIds": [90 + slot]})
    definition["links"].append({"id": 92, "origin_id": -10, "origin_slot": 2, "target_id": 5, "target_slot": 1, "type": "FLOAT"})
    inner_guidance["inputs"].append({"name": "guidance", "type": "FLOAT", "link": 92, "widget": {"name": "guidance"}})
    instance["inputs"].append({"name": "guidance", "type": "FLOAT", "link": None, "widget": {"name": "guidance"}})
    instance["widgets_values"] = [7.0, 2.5]  # "hidden" (not on the instance), then guidance
    assert inline(convert(document, registry))["nodes"]["50:5"]["inputs"]["guidance"] == 2.5


def test_legacy_group_node_is_inlined(registry):
    document = flux_custom_sampler()
    document["nodes"] = [n for n in document["nodes"] if n["id"] not in (4, 5)]
    document["nodes"].append(ui_node(30, "workflow>Encode", ["a blue ball", 2.0], [("clip", "CLIP", 3)], ["CONDITIONING"]))
    for link in document["links"]:
        if link[0] == 3:
            link[3], link[4] = 30, 0
        if link[0] == 5:
            link[1] = 30
    document["links"] = [li for li in document["links"] if li[0] != 4]
    document["extra"]["groupNodes"] = {"Encode": {
        "nodes": [{"index": 0, "type": "CLIPTextEncode", "inputs": [{"name": "clip", "type": "CLIP", "link": None}],
                   "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}], "widgets_values": ["x"]},
                  {"index": 1, "type": "FluxGuidance", "inputs": [{"name": "conditioning", "type": "CONDITIONING", "link": None}],
                   "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}], "widgets_values": [1.0]}],
        "links": [[0, 0, 1, 0, 0, "CONDITIONING"]], "external": []}}
    nodes = convert(document, registry)["nodes"]
    assert nodes["30:0"]["inputs"] == {"text": "a blue ball", "text_encoder": {"from": ["2", "text_encoder"]}}
    assert nodes["30:1"]["inputs"] == {"guidance": 2.0, "conditioning": {"from": ["30:0", "conditioning"]}}
    assert nodes["11"]["inputs"]["positive"] == {"from": ["30:1", "conditioning"]}


def test_links_as_objects_and_dict_positions_are_read(registry):
    document = flux_custom_sampler()
    document["links"] = [{"id": li[0], "origin_id": li[1], "origin_slot": li[2], "target_id": li[3], "target_slot": li[4],
                          "type": li[5]} for li in document["links"]]
    document["nodes"][0]["pos"] = {"0": 7, "1": 9}
    converted = convert(document, registry)
    assert converted["nodes"] == convert(flux_custom_sampler(), registry)["nodes"]
    assert converted["layout"]["nodes"]["1"]["pos"] == [7, 9]


def ksampler_advanced_graph(start: int, end: int) -> dict:
    api, _, _ = to_api(flux_custom_sampler())
    for key in ("6", "7", "8", "9", "11"):
        del api[key]
    api["11"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "add_noise": "enable", "noise_seed": 5, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": "enable", "model": ["1", 0],
        "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["10", 0]}}
    api["20"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 2.5}}
    api["11"]["inputs"]["model"] = ["20", 0]
    return api


def test_ksampler_advanced_becomes_scheduler_split_and_sampler(registry):
    document = convert(ksampler_advanced_graph(5, 15), registry)
    nodes = document["nodes"]
    assert nodes["11.1"]["inputs"] == {"model": {"from": ["1", "model"]}, "steps": 20, "scheduler": "auto", "shift": 2.5,
                                       "width": 768, "height": 1024}
    assert nodes["11.2"]["inputs"] == {"sigmas": {"from": ["11.1", "sigmas"]}, "step": 15}
    assert nodes["11.3"]["inputs"] == {"sigmas": {"from": ["11.2", "high"]}, "step": 5}
    assert nodes["11"]["inputs"]["sigmas"] == {"from": ["11.3", "low"]} and nodes["11"]["inputs"]["seed"] == 5
    assert only_missing_files(document, registry) == []
    whole = convert(ksampler_advanced_graph(0, 10000), registry)["nodes"]
    assert "11.2" not in whole and "11.3" not in whole and whole["11"]["inputs"]["sigmas"] == {"from": ["11.1", "sigmas"]}


def test_manual_sigmas_split_sigmas_and_disable_noise(registry):
    api, _, _ = to_api(flux_custom_sampler())
    api["9"] = {"class_type": "ManualSigmas", "inputs": {"sigmas": "1, 0.6, 0.3, 0"}}
    api["21"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["9", 0], "step": 1}}
    api["11"]["inputs"]["sigmas"] = ["21", 1]
    api["8"] = {"class_type": "DisableNoise", "inputs": {}}
    api["6"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["5", 0], "negative": ["4", 0], "cfg": 3.0}}
    document = convert(api, registry)
    sampler = document["nodes"]["11"]["inputs"]
    assert sampler["sigmas"] == {"from": ["21", "low"]} and sampler["add_noise"] is False and "seed" not in sampler
    assert sampler["cfg"] == 3.0 and sampler["negative"] == {"from": ["4", "conditioning"]}
    assert document["nodes"]["9"] == {"type": "ManualSigmas", "inputs": {"sigmas": "1, 0.6, 0.3, 0"}}
    assert only_missing_files(document, registry) == []


def test_folded_node_used_elsewhere_is_refused_in_one_line(registry):
    api, _, _ = to_api(flux_custom_sampler())
    api["30"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}}
    with pytest.raises(ComfyImportError, match="folds into samplers only"):
        convert(api, registry)


def test_switch_with_a_constant_condition_links_the_branch(registry):
    api, _, _ = to_api(flux_custom_sampler())
    api["31"] = {"class_type": "ComfySwitchNode", "inputs": {"switch": True, "on_false": ["4", 0], "on_true": ["5", 0]}}
    api["6"]["inputs"]["conditioning"] = ["31", 0]
    nodes = convert(api, registry)["nodes"]
    assert "31" not in nodes and nodes["11"]["inputs"]["positive"] == {"from": ["5", "conditioning"]}
    api["32"] = {"class_type": "PrimitiveBoolean", "inputs": {"value": False}}
    api["31"]["inputs"]["switch"] = ["32", 0]
    if registry.get("If") is None:  # a linked condition needs the lazy If node (branch engine)
        with pytest.raises(ComfyImportError, match="ComfySwitchNode \\(node 31\\) needs ditgraph's If node"):
            convert(api, registry)
        return
    nodes = convert(api, registry)["nodes"]  # a linked condition: the lazy If decides at run time
    assert nodes["31"]["type"] == "If" and nodes["31"]["inputs"]["condition"] == {"from": ["32", "value"]}
    assert nodes["11"]["inputs"]["positive"] == {"from": ["31", "value"]}


def test_utilities_map_onto_compat_nodes(registry):
    api = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png", "upload": "image"}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ComfyMathExpression", "inputs": {"expression": "a * 2", "values.a": ["2", 0]}},
        "4": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["1", 0], "upscale_method": "lanczos",
                                                                  "megapixels": 0.5, "resolution_steps": 8}},
        "5": {"class_type": "StringConcatenate", "inputs": {"string_a": "a", "string_b": "b", "delimiter": "-"}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    nodes = convert(api, registry)["nodes"]
    assert nodes["3"] == {"type": "MathExpression", "inputs": {"expression": "a * 2", "a": {"from": ["2", "width"]}}}
    assert nodes["6"]["inputs"] == {"value": {"from": ["3", "int"]}}
    assert nodes["4"]["inputs"]["method"] == "bicubic" and nodes["4"]["inputs"]["resolution_steps"] == 8
    assert nodes["5"]["type"] == "StringConcatenate"


def test_vae_decode_tiled_and_clip_text_encode_flux(registry):
    api, _, _ = to_api(flux_custom_sampler())
    api["12"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["11", 0], "vae": ["3", 0], "tile_size": 512,
                                                            "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}}
    api["5"] = {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "", "t5xxl": "a cube",
                                                               "guidance": 4.0}}
    document = convert(api, registry)
    nodes = document["nodes"]
    assert nodes["12"] == {"type": "VAEDecode", "inputs": {"latent": {"from": ["11", "latent"]},
                                                           "vae": {"from": ["3", "vae"]}, "tiled": "on"}}
    assert nodes["5.1"] == {"type": "TextEncode", "inputs": {"text_encoder": {"from": ["2", "text_encoder"]}, "text": "a cube"}}
    assert nodes["5"]["inputs"] == {"conditioning": {"from": ["5.1", "conditioning"]}, "guidance": 4.0}
    assert only_missing_files(document, registry) == []


def test_controlnet_on_conditioning_becomes_a_model_patch(registry):
    api, _, _ = to_api(flux_custom_sampler())
    api["40"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny"}}
    api["41"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    api["42"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["5", 0], "negative": ["5", 0], "control_net": ["40", 0], "image": ["41", 0], "vae": ["3", 0],
        "strength": 0.7, "start_percent": 0.0, "end_percent": 0.8}}
    api["6"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["42", 0], "negative": ["42", 1], "cfg": 2}}
    nodes = convert(api, registry)["nodes"]
    assert nodes["42"]["inputs"]["model"] == {"from": ["1", "model"]} and nodes["42"]["inputs"]["end"] == 0.8
    assert nodes["11"]["inputs"]["model"] == {"from": ["42", "model"]}
    assert nodes["11"]["inputs"]["positive"] == {"from": ["5", "conditioning"]}




@pytest.mark.parametrize("loader,value,family", [
    ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, "Stable Diffusion 1.x"),
    ("CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, "SDXL"),
    ("UNETLoader", {"unet_name": "hidream_e1_full_bf16.safetensors"}, "HiDream-E1"),
    ("UNETLoader", {"unet_name": "flux2_dev_fp8mixed.safetensors"}, "Flux.2"),
    ("UNETLoader", {"unet_name": "flux1-fill-dev.safetensors"}, "Flux.1 Fill"),
    ("CLIPLoader", {"clip_name": "t5.safetensors", "type": "cosmos"}, "Cosmos"),
    ("CheckpointLoaderSimple", {"ckpt_name": "hunyuan_dit_1.2.safetensors"}, "HunyuanDiT"),
])
def test_families_ditgraph_cannot_run_are_refused_in_one_line(loader, value, family, registry):
    api, _, _ = to_api(flux_custom_sampler())
    api["1"] = {"class_type": loader, "inputs": value}
    with pytest.raises(ComfyImportError) as caught:
        convert(api, registry)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(family) and "ditgraph runs" in message and "Flux.1" in message


@pytest.mark.parametrize("loader,value", [
    ("UNETLoader", {"unet_name": "qwen_image_fp8_e4m3fn.safetensors", "weight_dtype": "default"}),
    ("CheckpointLoaderSimple", {"ckpt_name": "AuraFlow-v0.3.safetensors"}),
    ("UNETLoader", {"unet_name": "flux1-kontext-dev.safetensors", "weight_dtype": "default"}),
    ("UNETLoader", {"unet_name": "hidream_i1_full_fp16.safetensors", "weight_dtype": "default"}),
])
def test_families_added_since_are_no_longer_refused(loader, value, registry):
    """Qwen-Image, AuraFlow, Flux.1 Kontext and HiDream-I1 run now (app/models/families): their files
    import like any runnable family's."""
    api, _, _ = to_api(flux_custom_sampler())
    api["1"] = {"class_type": loader, "inputs": value}
    document = convert(api, registry)
    assert document["nodes"]["1"]["type"] == "CheckpointLoader"


def test_a_runnable_family_is_not_refused(registry):
    api, _, _ = to_api(flux_custom_sampler())
    api["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "sd3.5_large.safetensors", "weight_dtype": "default"}}
    assert convert(api, registry)["nodes"]["1"]["inputs"] == {"checkpoint": "sd3.5_large.safetensors"}


def test_widget_orders_put_every_value_on_its_input(registry):
    """For each simple mapped type: the UI format's positional values land where the API format's named ones do."""
    checked = 0
    for kind, mapping in TABLE.items():
        if mapping.expand or mapping.folded or mapping.target is None or registry.get(mapping.target) is None:
            continue
        names = [w for w in mapping.widgets if not w.startswith("$")]
        values = {name: f"value of {name}" for name in names}
        ui = ui_graph([ui_node(1, kind, [values.get(w, "fixed") for w in mapping.widgets])], [])
        api = {"1": {"class_type": kind, "inputs": copy.deepcopy(values)}}
        assert convert(ui, registry)["nodes"]["1"]["inputs"] == convert(api, registry)["nodes"]["1"]["inputs"], kind
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize("damage,message", [
    (lambda d: d["nodes"].append({"id": 99}), "a node without an id and a type"),
    (lambda d: d["links"].append([1, 2, "IMAGE", 3, 0, "X"]), "a malformed link"),
    (lambda d: d["nodes"][0].update(inputs="model"), "node 1: 'inputs' is not a list of slots"),
    (lambda d: d["nodes"][0].update(widgets_values=7), "'widgets_values' is neither"),
    (lambda d: d.update(definitions={"subgraphs": [{"name": "no id"}]}), "a subgraph definition without an id"),
])
def test_malformed_editor_files_are_refused_in_one_line(damage, message, registry):
    document = flux_custom_sampler()
    damage(document)
    with pytest.raises(ComfyImportError, match=message):
        convert(document, registry)


def test_malformed_api_files_are_refused_in_one_line(registry):
    with pytest.raises(ComfyImportError, match="'inputs' is not an object"):
        convert({"1": {"class_type": "PreviewAny", "inputs": [1]}}, registry)
    with pytest.raises(ComfyImportError, match="'class_type' is not a string"):
        convert({"1": {"class_type": {"x": 1}, "inputs": {}}}, registry)


@pytest.mark.parametrize("kind,widgets", [("SaveAnimatedWEBP", ["clip", 12, False, 80, "default"]),
                                          ("SaveWEBM", ["clip", "vp9", 12, 32])])
def test_animated_savers_write_mp4(kind, widgets, registry):
    document = flux_custom_sampler()
    document["nodes"].append(ui_node(40, kind, widgets, [("images", "IMAGE", 40)]))
    document["links"].append([40, 12, 0, 40, 0, "IMAGE"])
    converted = convert(document, registry)
    assert converted["nodes"]["40"] == {"type": "SaveAnimated", "inputs": {
        "images": {"from": ["12", "image"]}, "filename_prefix": "clip", "fps": 12, "format": "mp4"}}
    assert only_missing_files(converted, registry) == []


def test_image_batches_and_compare(registry):
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
           "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
           "3": {"class_type": "BatchImagesNode", "inputs": {"images.image0": ["1", 0], "images.image1": ["2", 0],
                                                             "images.image2": ["1", 0]}},
           "4": {"class_type": "ImageCompare", "inputs": {"image_a": ["1", 0], "image_b": ["3", 0]}}}
    nodes = convert(api, registry)["nodes"]
    assert nodes["3.1"] == {"type": "ImageBatch", "inputs": {"first": {"from": ["1", "image"]}, "second": {"from": ["2", "image"]}}}
    assert nodes["3"]["inputs"] == {"first": {"from": ["3.1", "image"]}, "second": {"from": ["1", "image"]}}
    assert nodes["4"] == {"type": "PreviewImage", "inputs": {"images": {"from": ["3", "image"]}}}
