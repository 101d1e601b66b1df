"""ComfyUI Wan / LTX-Video workflows -> ditgraph's video nodes (both formats)."""

from __future__ import annotations

import pytest

from app.core.workflow import Workflow, errors, validate
from app.fronts.cli import make_registry
from app.fronts.comfy import ComfyImportError, convert, export_comfy
from tests.fixtures.comfy_graphs import (  # noqa: F401
    _sampler,  # noqa: F401
    ltx_text_to_video,
    ui_graph,
    ui_node,
    wan22_two_experts,
)

MISSING_FILE = "not found (looked in"


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def only_missing_files(document: dict, registry) -> list[str]:
    return [str(p) for p in errors(validate(Workflow.from_dict(document), registry)) if MISSING_FILE not in p.message]


def test_wan22_two_experts_become_two_samplers_on_split_sigmas(registry):
    document = convert(wan22_two_experts(), registry)
    nodes = document["nodes"]
    assert nodes["8"]["type"] == "EmptyVideoLatent" and nodes["8"]["inputs"]["frames"] == 81
    assert nodes["8"]["inputs"]["model"] == {"from": ["1", "model"]}  # wired from the sampler it feeds
    assert nodes["9"]["inputs"]["model"] == {"from": ["1", "model"]} and nodes["10"]["inputs"]["model"] == {"from": ["2", "model"]}
    # steps linked from a primitive: its value; the high expert runs steps 0-10, the low one 10-20
    assert nodes["9.1"]["inputs"]["steps"] == 20 and nodes["9.1"]["inputs"]["shift"] == 8.0
    assert nodes["9.2"]["inputs"]["step"] == 10 and nodes["9"]["inputs"]["sigmas"] == {"from": ["9.2", "high"]}
    assert nodes["10.3"]["inputs"]["step"] == 10 and nodes["10"]["inputs"]["sigmas"] == {"from": ["10.3", "low"]}
    assert nodes["10"]["inputs"]["add_noise"] is False and nodes["10"]["inputs"]["latent"] == {"from": ["9", "latent"]}
    assert nodes["13"] == {"type": "FramesToVideo", "inputs": {"images": {"from": ["12", "image"]}, "fps": 16}}
    assert nodes["14"]["inputs"]["format"] == "mp4" and nodes["14"]["inputs"]["video"] == {"from": ["13", "video"]}
    assert only_missing_files(document, registry) == []


def test_wan_image_to_video_takes_the_samplers_model(registry):
    api = wan22_two_experts()
    api["15"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
    api["16"] = {"class_type": "WanImageToVideo", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "vae": ["11", 0], "start_image": ["15", 0],
        "width": 832, "height": 480, "length": 49, "batch_size": 1}}
    for sampler in ("9", "10"):
        api[sampler]["inputs"].update(positive=["16", 0], negative=["16", 1])
    api["9"]["inputs"]["latent_image"] = ["16", 2]
    nodes = convert(api, registry)["nodes"]
    assert nodes["16"]["type"] == "ImageToVideo" and nodes["16"]["inputs"]["frames"] == 49
    assert nodes["16"]["inputs"]["model"] == {"from": ["1", "model"]}
    assert nodes["9"]["inputs"]["negative"] == {"from": ["16", "negative"]}
    assert nodes["9"]["inputs"]["latent"] == {"from": ["16", "latent"]}
    api["16"]["inputs"]["clip_vision_output"] = ["17", 0]
    api["17"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["18", 0], "image": ["15", 0], "crop": "none"}}
    api["18"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_h.safetensors"}}
    with pytest.raises(ComfyImportError, match=r"^CLIP-vision image conditioning \(as Wan 2.1 image-to-video uses\) workflow") as err:
        convert(api, registry)
    assert "\n" not in str(err.value)


def test_ltx_conditioning_scheduler_and_latent(registry):
    document = convert(ltx_text_to_video(), registry)
    nodes = document["nodes"]
    assert nodes["5"] == {"type": "ConditioningFrameRate", "inputs": {"conditioning": {"from": ["3", "conditioning"]}, "frame_rate": 24}}
    assert nodes["5.1"]["inputs"] == {"conditioning": {"from": ["4", "conditioning"]}, "frame_rate": 24}
    assert nodes["9"]["inputs"]["negative"] == {"from": ["5.1", "conditioning"]}
    assert nodes["7"]["type"] == "Scheduler" and nodes["7"]["inputs"]["model"] == {"from": ["1", "model"]}
    assert nodes["7"]["inputs"]["steps"] == 30 and "max_shift" not in nodes["7"]["inputs"]
    assert (nodes["7"]["inputs"]["width"], nodes["7"]["inputs"]["height"]) == (768, 512)
    assert nodes["6"]["inputs"]["model"] == {"from": ["1", "model"]}
    assert only_missing_files(document, registry) == []


@pytest.mark.parametrize("kind,family", [
    ("WanVaceToVideo", "Wan VACE"), ("WanFirstLastFrameToVideo", "Wan first-last-frame"),
    ("LTXVImgToVideo", "LTX-Video image-to-video"), ("LTXVConcatAVLatent", "LTX-2"),
    ("Wan22ImageToVideoLatent", "Wan 2.2 TI2V-5B"),
])
def test_video_variants_ditgraph_lacks_are_refused_in_one_line(kind, family, registry):
    api = ltx_text_to_video() if kind.startswith("LTX") else wan22_two_experts()
    api["99"] = {"class_type": kind, "inputs": {}}
    with pytest.raises(ComfyImportError, match=f"^{family}") as err:
        convert(api, registry)
    assert "\n" not in str(err.value)


def test_audio_of_a_video_is_refused_in_one_line(registry):
    api = {"1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
           "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
           "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    with pytest.raises(ComfyImportError, match="no sound track"):
        convert(api, registry)
    api["3"]["inputs"]["source"] = ["2", 2]
    assert convert(api, registry)["nodes"]["3"]["inputs"]["value"] == {"from": ["2", "fps"]}


def test_video_nodes_in_the_editor_format(registry):
    """LoadVideo -> GetVideoComponents -> ImageScaleBy -> CreateVideo -> SaveVideo, widgets by position."""
    document = ui_graph([
        ui_node(1, "LoadVideo", ["clip.mp4", "image"], outputs=["VIDEO"]),
        ui_node(2, "GetVideoComponents", [], inputs=[("video", "VIDEO", 1)], outputs=["IMAGE", "AUDIO", "FLOAT"]),
        ui_node(3, "ImageScaleBy", ["lanczos", 0.5], inputs=[("image", "IMAGE", 2)], outputs=["IMAGE"]),
        ui_node(4, "CreateVideo", [12], inputs=[("images", "IMAGE", 3), ("audio", "AUDIO", None)], outputs=["VIDEO"]),
        ui_node(5, "SaveVideo", ["video/out", "auto", "auto"], inputs=[("video", "VIDEO", 4)]),
    ], [(1, 1, 0, 2, 0, "VIDEO"), (2, 2, 0, 3, 0, "IMAGE"), (3, 3, 0, 4, 0, "IMAGE"), (4, 4, 0, 5, 0, "VIDEO")])
    nodes = convert(document, registry)["nodes"]
    assert nodes["1"] == {"type": "LoadVideo", "inputs": {"video": "clip.mp4"}}
    assert nodes["3"]["inputs"] == {"image": {"from": ["2", "images"]}, "method": "bicubic", "scale_by": 0.5}
    assert nodes["4"]["inputs"] == {"images": {"from": ["3", "image"]}, "fps": 12}
    assert nodes["5"]["inputs"] == {"video": {"from": ["4", "video"]}, "filename_prefix": "video/out", "format": "mp4"}


def test_clip_set_last_layer_dissolves(registry):
    api = ltx_text_to_video()
    api["12"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["2", 0], "stop_at_clip_layer": -2}}
    api["3"]["inputs"]["clip"] = ["12", 0]
    document = convert(api, registry)
    assert "12" not in document["nodes"] and document["nodes"]["3"]["inputs"]["text_encoder"] == {"from": ["2", "text_encoder"]}
    assert any("CLIPSetLastLayer" in note for note in document["meta"]["import_notes"])


@pytest.mark.parametrize("graph", [wan22_two_experts, ltx_text_to_video])
def test_video_workflows_round_trip_through_the_api_format(graph, registry):
    document = convert(graph(), registry)
    exported = export_comfy(document)
    assert exported["5" if graph is ltx_text_to_video else "8"]["class_type"] in ("LTXVConditioning", "EmptyHunyuanLatentVideo")
    assert convert(exported, registry)["nodes"] == document["nodes"]


def test_linked_step_counts_stay_links(registry):
    """Lightning-LoRA templates switch between step counts: the schedule takes the switch's link."""
    api = wan22_two_experts()
    api["21"] = {"class_type": "PrimitiveBoolean", "inputs": {"value": True}}
    api["22"] = {"class_type": "PrimitiveInt", "inputs": {"value": 4}}
    api["23"] = {"class_type": "ComfySwitchNode", "inputs": {"switch": ["21", 0], "on_true": ["22", 0], "on_false": ["20", 0]}}
    api["24"] = {"class_type": "ComfyMathExpression", "inputs": {"expression": "a // 2", "values.a": ["23", 0]}}
    for sampler in ("9", "10"):
        api[sampler]["inputs"]["steps"] = ["23", 0]
    api["9"]["inputs"]["end_at_step"] = api["10"]["inputs"]["start_at_step"] = ["24", 1]
    document = convert(api, registry)
    nodes = document["nodes"]
    assert nodes["9.1"]["inputs"]["steps"] == {"from": ["23", "value"]} and nodes["23"]["type"] == "If"
    assert nodes["9.2"]["inputs"]["step"] == nodes["10.3"]["inputs"]["step"] == {"from": ["24", "int"]}
    assert "10.2" not in nodes  # end_at_step 10000 never cuts
    assert only_missing_files(document, registry) == []
    assert convert(export_comfy(document), registry)["nodes"] == nodes


def test_generic_clip_vision_or_llm_nodes_name_no_family_alone(registry):
    from app.fronts.comfy import families

    assert families.detect({"1": {"class_type": "CLIPVisionEncode", "inputs": {}}}) == {}
    assert list(families.detect({"1": {"class_type": "TextGenerate", "inputs": {}}})) == ["llm"]
    api = ltx_text_to_video()
    api["12"] = {"class_type": "TextGenerate", "inputs": {}}  # an LLM writing the prompt of a diffusion workflow
    assert list(families.detect(api)) == ["ltx"]
