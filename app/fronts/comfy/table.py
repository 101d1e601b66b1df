"""The mapping table: one entry per ComfyUI node type (data, documented in docs/comfy_import.md).

Each :class:`NodeMap` says which ditgraph node a ComfyUI type becomes, how its inputs are
renamed, which of its outputs is which, and the order of its editor widgets (the positional
``widgets_values`` of the UI format; ``$``-names are widgets that carry no input, such as
ComfyUI's "control after generate" and upload buttons).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.fronts.comfy import decompose as d


class ComfyImportError(ValueError):
    """The file cannot be imported; ``unmapped`` lists the ComfyUI types we have no node for."""

    def __init__(self, message: str, unmapped: list[str] | None = None):
        self.unmapped = unmapped or []
        super().__init__(message)


Translate = Callable[[Any], tuple[Any, str | None]]  # value -> (our value, note for the user or None)
Fixup = Callable[[str, dict, list, set], None]  # (node id, converted nodes, notes, installed types)
CONTROL, UPLOAD, SHOWN = "$control", "$upload", "$shown"  # widgets without an input of their own
VIDEO_NODES = "the video nodes of nodes/video.py and EmptyVideoLatent of nodes/latent.py"
NO_OUTPUT = "!"  # an output index ours lacks: "!" + why, said when something links to it
LAZY_IF = "the lazy If of nodes/core.py; a constant switch needs no node"


@dataclass(frozen=True)
class NodeMap:
    """How one ComfyUI node type becomes ditgraph nodes."""

    target: str | None  # the ditgraph node type; None: the node dissolves (see passthrough / folded)
    outputs: tuple[str, ...]  # ComfyUI output index -> our output name
    inputs: dict[str, str] = field(default_factory=dict)  # ComfyUI input name -> ours (same name if absent)
    widgets: tuple[str, ...] = ()  # the UI format's widget order (ComfyUI input names)
    drop: frozenset[str] = frozenset()  # ComfyUI inputs with no counterpart, ignored on purpose
    values: dict[str, Translate] = field(default_factory=dict)  # our input name -> value translation
    fixup: Fixup | None = None
    # ComfyUI outputs our node lacks that only pass an input through (LoraLoader's CLIP): output
    # index -> the ComfyUI input whose link its consumers get instead
    passthrough: dict[int, str] = field(default_factory=dict)
    # (raw node) -> the ComfyUI input its consumers get (a switch whose condition is a constant)
    select: Callable[[dict], str] | None = None
    # one ComfyUI node that becomes several of ours: (node id, raw node, context) -> (extra nodes by
    # id, inputs of the main node); the extra nodes' ids are "<id>.<n>", their types in ``creates``
    expand: Callable[[str, dict, Any], tuple[dict[str, dict], dict[str, Any]]] | None = None
    creates: tuple[str, ...] = ()
    folded: bool = False  # no node of its own: the consumer that takes its output reads its inputs
    requires: str = ""  # where ``target`` comes from when this installation lacks it
    note: str = ""
    # a ComfyUI dynamic combo (DynamicCombo) widget: its name -> {option: the sub-widgets that option
    # shows}; in the editor format their values follow the combo's, in the API format they are
    # inputs "<combo>.<sub>"
    dynamic: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    # (raw node) -> the ditgraph type when it depends on a value (ResizeImageMaskNode's resize_type);
    # every type it may pick is ``target`` or in ``creates``
    pick: Callable[[dict], str] | None = None


def choice(table: dict[str, str], default: str, what: str) -> Translate:
    def translate(value: Any) -> tuple[Any, str | None]:
        if value in table:
            return table[value], None
        return default, f"{what} {value!r} has no ditgraph equivalent; using {default!r}"

    return translate


SAMPLERS = {"euler": "euler", "euler_ancestral": "euler", "euler_cfg_pp": "euler", "heun": "heun", "dpmpp_2m": "dpmpp_2m",
            "dpmpp_2m_sde": "dpmpp_2m", "dpmpp_2m_sde_gpu": "dpmpp_2m",
            "lcm": "lcm"}  # HiDream Dev/Fast: x0, then re-noised to the next sigma (ComfyUI's and ours alike)
SCHEDULERS = {"karras": "karras", "normal": "auto", "simple": "auto", "sgm_uniform": "auto", "beta": "auto",
              "linear_quadratic": "linear", "ddim_uniform": "discrete"}
sampler_name = choice(SAMPLERS, "euler", "sampler")
scheduler_name = choice(SCHEDULERS, "auto", "scheduler")
UPSCALE = choice({"nearest-exact": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic", "area": "bilinear",
                  "bislerp": "bilinear", "lanczos": "bicubic"}, "bilinear", "upscale method")

_PRIMITIVE = dict(outputs=("value",), widgets=("value",))
_VIDEO_LATENT = NodeMap("EmptyVideoLatent", ("latent",), widgets=("width", "height", "length", "batch_size"),
                        inputs={"length": "frames"}, fixup=d.wire_empty_latent, requires=VIDEO_NODES)

CONTROL_INPUTS = {"control_net": "control", "start_percent": "start", "end_percent": "end"}

TABLE: dict[str, NodeMap] = {
    # core primitives and utilities
    "PrimitiveInt": NodeMap("PrimitiveInt", ("value",), widgets=("value", CONTROL)),
    "PrimitiveFloat": NodeMap("PrimitiveFloat", **_PRIMITIVE),
    "PrimitiveString": NodeMap("PrimitiveString", **_PRIMITIVE),
    "PrimitiveStringMultiline": NodeMap("PrimitiveString", **_PRIMITIVE),
    "PrimitiveBoolean": NodeMap("PrimitiveBoolean", **_PRIMITIVE),
    "PreviewAny": NodeMap("PreviewAny", (), {"source": "value"}, widgets=(SHOWN, SHOWN, SHOWN)),
    "Note": NodeMap("Note", (), widgets=("text",)),
    "MarkdownNote": NodeMap("Note", (), widgets=("text",)),
    "ComfySwitchNode": NodeMap("If", ("value",), {"switch": "condition", "on_true": "if_true", "on_false": "if_false"},
                               widgets=("switch",), select=d.switch_branch, requires=LAZY_IF),
    "StringConcatenate": NodeMap("StringConcatenate", ("string",), widgets=("string_a", "string_b", "delimiter")),
    "ComfyMathExpression": NodeMap("MathExpression", ("float", "int"), widgets=("expression",),
                                   expand=d.math_expression),
    # loaders
    "CheckpointLoaderSimple": NodeMap("CheckpointLoader", ("model", "text_encoder", "vae"), {"ckpt_name": "checkpoint"},
                                      widgets=("ckpt_name",)),
    "UNETLoader": NodeMap("CheckpointLoader", ("model",), {"unet_name": "checkpoint"}, widgets=("unet_name", "weight_dtype"),
                          drop=frozenset({"weight_dtype"}),
                          note="the diffusion model file loads through CheckpointLoader (dtype: auto)"),
    "CLIPLoader": NodeMap("TextEncoderLoader", ("text_encoder",), {"clip_name": "text_encoder"},
                          widgets=("clip_name", "type", "device"), drop=frozenset({"type", "device"})),
    "DualCLIPLoader": NodeMap("CombineTextEncoders", ("text_encoder",), widgets=("clip_name1", "clip_name2", "type", "device"),
                              expand=d.clip_loaders(2), creates=("TextEncoderLoader",)),
    "TripleCLIPLoader": NodeMap("CombineTextEncoders", ("text_encoder",), widgets=("clip_name1", "clip_name2", "clip_name3"),
                                expand=d.clip_loaders(3), creates=("TextEncoderLoader",)),
    # HiDream: CLIP-L, CLIP-G, T5-XXL and Llama-3.1-8B, merged as one TEXT_ENCODER
    "QuadrupleCLIPLoader": NodeMap("CombineTextEncoders", ("text_encoder",),
                                   widgets=("clip_name1", "clip_name2", "clip_name3", "clip_name4"),
                                   expand=d.clip_loaders(4), creates=("TextEncoderLoader",)),
    "VAELoader": NodeMap("VAELoader", ("vae",), {"vae_name": "vae"}, widgets=("vae_name",)),
    "LoraLoaderModelOnly": NodeMap("LoraLoader", ("model",), {"lora_name": "lora", "strength_model": "strength"},
                                   widgets=("lora_name", "strength_model")),
    "LoraLoader": NodeMap("LoraLoader", ("model",), {"lora_name": "lora", "strength_model": "strength"},
                          widgets=("lora_name", "strength_model", "strength_clip"),
                          drop=frozenset({"clip", "strength_clip"}), passthrough={1: "clip"},
                          note="the LoRA is applied to the MODEL only; its CLIP output passes the text encoder through"),
    "ModelSamplingSD3": NodeMap(None, (), widgets=("shift",), passthrough={0: "model"}),
    "ModelSamplingAuraFlow": NodeMap(None, (), widgets=("shift",), passthrough={0: "model"}),
    "ModelSamplingFlux": NodeMap(None, (), widgets=("max_shift", "base_shift", "width", "height"), passthrough={0: "model"},
                                 note="dissolved: Flux's resolution-dependent shift is the sampler's scheduler 'auto'"),
    # text
    "CLIPTextEncode": NodeMap("TextEncode", ("conditioning",), {"clip": "text_encoder"}, widgets=("text",),
                              fixup=d.negative_only),
    "CLIPTextEncodeFlux": NodeMap("FluxGuidance", ("conditioning",), widgets=("clip_l", "t5xxl", "guidance"),
                                  expand=d.clip_text_encode_flux, creates=("TextEncode",)),
    "CLIPTextEncodeSD3": NodeMap("TextEncode", ("conditioning",), widgets=("clip_l", "clip_g", "t5xxl", "empty_padding"),
                                 expand=d.clip_text_encode_sd3),
    "ConditioningZeroOut": NodeMap("ConditioningZeroOut", ("conditioning",)),
    "FluxGuidance": NodeMap("FluxGuidance", ("conditioning",), widgets=("guidance",)),
    # sampling
    "KSampler": NodeMap("Sampler", ("latent",), {"latent_image": "latent", "sampler_name": "sampler"},
                        widgets=("seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"),
                        values={"sampler": sampler_name, "scheduler": scheduler_name}),
    "KSamplerAdvanced": NodeMap("SamplerCustom", ("latent",),
                                widgets=("add_noise", "noise_seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler",
                                         "start_at_step", "end_at_step", "return_with_leftover_noise"),
                                expand=d.ksampler_advanced, creates=("Scheduler", "SplitSigmas"), fixup=d.scheduler_size),
    "SamplerCustom": NodeMap("SamplerCustom", ("latent", "latent"), widgets=("add_noise", "noise_seed", CONTROL, "cfg"),
                             expand=d.sampler_custom),
    "SamplerCustomAdvanced": NodeMap("SamplerCustom", ("latent", "latent"), expand=d.sampler_custom_advanced,
                                     note="its denoised_output is the final latent (the schedule ends at sigma 0)"),
    "KSamplerSelect": NodeMap(None, (), widgets=("sampler_name",), folded=True),
    "RandomNoise": NodeMap(None, (), widgets=("noise_seed", CONTROL), folded=True),
    "DisableNoise": NodeMap(None, (), folded=True),
    "BasicGuider": NodeMap(None, (), folded=True),
    "CFGGuider": NodeMap(None, (), widgets=("cfg",), folded=True),
    "BasicScheduler": NodeMap("Scheduler", ("sigmas",), widgets=("scheduler", "steps", "denoise"),
                              values={"scheduler": scheduler_name}, fixup=d.scheduler_size),
    "ManualSigmas": NodeMap("ManualSigmas", ("sigmas",), widgets=("sigmas",)),
    "SplitSigmas": NodeMap("SplitSigmas", ("high", "low"), widgets=("step",)),
    # control: ComfyUI's ControlNet rides on the conditioning, ours patches the model
    "ControlNetLoader": NodeMap("ControlNetLoader", ("control",), {"control_net_name": "controlnet"},
                                widgets=("control_net_name",)),
    "ControlNetApply": NodeMap("ApplyControlNet", (), CONTROL_INPUTS, widgets=("strength",), passthrough={0: "conditioning"},
                               expand=d.apply_controlnet),
    "ControlNetApplyAdvanced": NodeMap("ApplyControlNet", (), CONTROL_INPUTS, widgets=("strength", "start_percent", "end_percent"),
                                       passthrough={0: "positive", 1: "negative"}, expand=d.apply_controlnet),
    "ControlNetApplySD3": NodeMap("ApplyControlNet", (), CONTROL_INPUTS, widgets=("strength", "start_percent", "end_percent"),
                                  passthrough={0: "positive", 1: "negative"}, expand=d.apply_controlnet),
    "Canny": NodeMap("Canny", ("image",), widgets=("low_threshold", "high_threshold")),
    "ImageScale": NodeMap("ImageScale", ("image",), {"upscale_method": "method"},
                          widgets=("upscale_method", "width", "height", "crop"), values={"method": UPSCALE}),
    # latents
    "EmptyLatentImage": NodeMap("EmptyLatent", ("latent",), widgets=("width", "height", "batch_size"), fixup=d.wire_empty_latent),
    "EmptySD3LatentImage": NodeMap("EmptyLatent", ("latent",), widgets=("width", "height", "batch_size"),
                                   fixup=d.wire_empty_latent),
    "VAEDecode": NodeMap("VAEDecode", ("image",), {"samples": "latent"}),
    "VAEDecodeTiled": NodeMap("VAEDecode", ("image",), {"samples": "latent"},
                              widgets=("tile_size", "overlap", "temporal_size", "temporal_overlap"),
                              drop=frozenset({"tile_size", "overlap", "temporal_size", "temporal_overlap"}),
                              expand=d.tiled_decode, note="decoded with tiled='on' (ditgraph picks the tile size)"),
    "VAEEncode": NodeMap("VAEEncode", ("latent",), {"pixels": "image"}),
    "SetLatentNoiseMask": NodeMap("SetLatentNoiseMask", ("latent",), {"samples": "latent"}),
    "RepeatLatentBatch": NodeMap("RepeatLatentBatch", ("latent",), {"samples": "latent"}, widgets=("amount",)),
    "LatentFromBatch": NodeMap("LatentFromBatch", ("latent",), {"samples": "latent", "batch_index": "index"},
                               widgets=("batch_index", "length")),
    "LatentBatch": NodeMap("LatentBatch", ("latent",), {"samples1": "first", "samples2": "second"}),
    "LatentUpscaleBy": NodeMap("UpscaleLatent", ("latent",), {"samples": "latent", "upscale_method": "mode", "scale_by": "scale"},
                               widgets=("upscale_method", "scale_by"), values={"mode": UPSCALE}),
    # images and masks
    "GetImageSize": NodeMap("ImageSize", ("width", "height", "batch_size"), widgets=(SHOWN,)),
    "ImageScaleToTotalPixels": NodeMap("ScaleToMegapixels", ("image",), {"upscale_method": "method"},
                                       widgets=("upscale_method", "megapixels", "resolution_steps"), values={"method": UPSCALE}),
    "InvertMask": NodeMap("InvertMask", ("mask",)),
    "ThresholdMask": NodeMap("ThresholdMask", ("mask",), {"value": "threshold"}, widgets=("value",)),
    "GrowMask": NodeMap("GrowMask", ("mask",), {"expand": "pixels"}, widgets=("expand", "tapered_corners"),
                        drop=frozenset({"tapered_corners"})),
    "SolidMask": NodeMap("SolidMask", ("mask",), widgets=("value", "width", "height")),
    "MaskToImage": NodeMap("MaskToImage", ("image",)),
    "ImageToMask": NodeMap("MaskFromImage", ("mask",), widgets=("channel",)),
    "LoadImageMask": NodeMap("LoadImageMask", ("mask",), widgets=("image", "channel", UPLOAD), drop=frozenset({"upload"})),
    "SaveImage": NodeMap("SaveImage", (), widgets=("filename_prefix",)),
    "PreviewImage": NodeMap("PreviewImage", ()),
    "LoadImage": NodeMap("LoadImage", ("image", "mask"), widgets=("image", UPLOAD), drop=frozenset({"upload"})),
    "ImageBatch": NodeMap("ImageBatch", ("image",), {"image1": "first", "image2": "second"}),
    "BatchImagesNode": NodeMap("ImageBatch", ("image",), expand=d.batch_images),
    "ImageCompare": NodeMap("PreviewImage", (), {"image_b": "images"}, widgets=(SHOWN,), drop=frozenset({"image_a"}),
                            note="a before/after comparison: previewed here as its second image only"),
    "SaveAnimatedWEBP": NodeMap("SaveAnimated", (), widgets=("filename_prefix", "fps", "lossless", "quality", "method"),
                                drop=frozenset({"lossless", "quality", "method"}), expand=d.animated_webp,
                                note="saved as an MP4 animation (ditgraph writes GIF or MP4, not animated WEBP)"),
    "SaveWEBM": NodeMap("SaveAnimated", (), widgets=("filename_prefix", "codec", "fps", "crf"),
                        drop=frozenset({"codec", "crf"}), expand=d.animated_webp,
                        note="saved as an MP4 animation (ditgraph writes GIF or MP4, not WebM)"),
    # video (nodes/video.py; the empty latent is nodes/latent.py's EmptyVideoLatent)
    "EmptyHunyuanLatentVideo": _VIDEO_LATENT,
    "EmptyLTXVLatentVideo": _VIDEO_LATENT,
    "SaveVideo": NodeMap("SaveVideo", (), widgets=("filename_prefix", "format", "codec"), drop=frozenset({"codec"}),
                         values={"format": choice({"auto": "mp4", "mp4": "mp4", "webm": "webm"}, "mp4", "video format")},
                         requires=VIDEO_NODES),
    "LoadVideo": NodeMap("LoadVideo", ("video",), {"file": "video"}, widgets=("file", UPLOAD), drop=frozenset({"upload"}),
                         requires=VIDEO_NODES),
    "CreateVideo": NodeMap("FramesToVideo", ("video",), widgets=("fps",), drop=frozenset({"audio"}), requires=VIDEO_NODES,
                           note="its audio input is not kept (ditgraph videos have no sound track)"),
    "GetVideoComponents": NodeMap("VideoFrames", ("images", NO_OUTPUT + "ditgraph videos have no sound track", "fps"),
                                  requires=VIDEO_NODES),
    "WanImageToVideo": NodeMap("ImageToVideo", ("positive", "negative", "latent"), {"length": "frames"},
                               widgets=("width", "height", "length", "batch_size"), expand=d.image_to_video,
                               requires=VIDEO_NODES),
    "LTXVConditioning": NodeMap("ConditioningFrameRate", ("conditioning", ".1/conditioning"), widgets=("frame_rate",),
                                expand=d.frame_rate_pair, requires=VIDEO_NODES),
    "LTXVScheduler": NodeMap("Scheduler", ("sigmas",), widgets=("steps", "max_shift", "base_shift", "stretch", "terminal"),
                             drop=frozenset({"max_shift", "base_shift", "stretch", "terminal", "latent"}),
                             fixup=d.wire_scheduler_model,
                             note="its shift settings are dropped: the scheduler 'auto' uses LTX-Video's own flow shift"),
    "LTXVPreprocess": NodeMap(None, (), widgets=("img_compression",), passthrough={0: "image"},
                              note="dissolved: ditgraph does not add LTX's compression artifacts to the input image"),
    "CLIPSetLastLayer": NodeMap(None, (), widgets=("stop_at_clip_layer",), passthrough={0: "clip"},
                                note="dissolved: ditgraph's DiT text encoders use their family's own layer"),
    "ImageScaleBy": NodeMap("ImageScaleBy", ("image",), {"upscale_method": "method"}, widgets=("upscale_method", "scale_by"),
                            values={"method": UPSCALE}),
    # -- guidance patches, Flux.1 Kontext and utilities of the official templates (issue 23) ----------
    "CFGNorm": NodeMap("CFGNorm", ("model",), widgets=("strength", "pre_cfg")),
    "FreSca": NodeMap("FreSca", ("model",), widgets=("scale_low", "scale_high", "freq_cutoff")),
    "T5TokenizerOptions": NodeMap(None, (), widgets=("min_padding", "min_length"), passthrough={0: "clip"},
                                  note="dissolved: ditgraph pads and masks T5 prompts as the family's diffusers "
                                       "pipeline does (ChromaPipeline keeps one padding token)"),
    "ReferenceLatent": NodeMap("ReferenceLatent", ("conditioning",)),
    "FluxKontextMultiReferenceLatentMethod": NodeMap(
        None, (), widgets=("reference_latents_method",), passthrough={0: "conditioning"},
        note="dissolved: ditgraph places one reference image as Flux.1 Kontext does (ComfyUI's 'offset'/'index'); "
             "other placements follow the model's diffusers config"),
    "FluxKontextImageScale": NodeMap("FluxKontextImageScale", ("image",)),
    "ImageStitch": NodeMap("ImageStitch", ("image",), widgets=("direction", "match_image_size", "spacing_width",
                                                               "spacing_color")),
    "ImageScaleToMaxDimension": NodeMap("ScaleToSide", ("image",), {"upscale_method": "method", "largest_size": "size"},
                                        widgets=("upscale_method", "largest_size"), values={"method": UPSCALE}),
    "ResizeImageMaskNode": NodeMap("ImageScale", ("image",), widgets=("resize_type", "scale_method"),
                                   dynamic={"resize_type": d.RESIZE_WIDGETS}, pick=d.resize_kind, expand=d.resize_image,
                                   creates=("ImageScaleBy", "ScaleToMegapixels", "ScaleToSide", "ImageSize")),
    "ResolutionSelector": NodeMap("ResolutionSelector", ("width", "height"),
                                  widgets=("aspect_ratio", "megapixels", "multiple", "minimum"), drop=frozenset({"minimum"})),
    "SaveImageAdvanced": NodeMap("SaveImage", (), widgets=("filename_prefix", "format"),
                                 dynamic={"format": d.SAVE_FORMAT_WIDGETS}, expand=d.save_image_advanced,
                                 passthrough={0: "images"}),
    "ImageFromBatch": NodeMap("ImageFromBatch", ("image",), {"batch_index": "index"}, widgets=("batch_index", "length")),
    "ModelAttentionBackend": NodeMap("AttentionBackend", ("model",), widgets=("attention",), expand=d.attention_backend),
    # Qwen-Image-Edit: one TextEncodeImageEdit (nodes/text.py) whose mode is the ComfyUI type's
    "TextEncodeQwenImageEdit": NodeMap("TextEncodeImageEdit", ("conditioning",), {"clip": "text_encoder", "prompt": "text"},
                                       widgets=("prompt",), fixup=d.constant_inputs(mode="edit")),
    "TextEncodeQwenImageEditPlus": NodeMap("TextEncodeImageEdit", ("conditioning",),
                                           {"clip": "text_encoder", "prompt": "text", "image1": "image"},
                                           widgets=("prompt",), fixup=d.constant_inputs(mode="edit-plus")),
}
