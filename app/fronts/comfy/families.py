"""Which model family a ComfyUI workflow is for, so one ditgraph cannot run is refused in one line.

Evidence, most specific first: the model files its loaders name, node types that exist for
one family only, and (only when nothing else tells) the ``type`` of its CLIP loaders. A
family is runnable when app.models.families knows it; the keys here are those names. Variants
of a runnable family that need conditioning ditgraph lacks (Flux Fill, Wan VACE, Wan 2.1
CLIP-vision I2V, LTX-2 audio+video, ...) have keys of their own that it does not know; a variant
in ``RUNS_AS`` (Flux.1 Kontext) runs once its family has the capability it needs. Node types in
``NEEDS`` (ControlNet, ReferenceLatent) are refused on a family without that capability.
"""

from __future__ import annotations

from typing import Any

from app.fronts.comfy.table import ComfyImportError
from app.models.families import FAMILIES

NAMES = {
    "flux": "Flux.1", "sd3": "SD3/3.5", "pixart": "PixArt", "sana": "Sana", "lumina2": "Lumina 2", "wan": "Wan",
    "ltx": "LTX-Video", "flux-fill": "Flux.1 Fill (inpainting model)", "flux-kontext": "Flux.1 Kontext",
    "flux-canny": "Flux.1 Canny (control model)", "flux-depth": "Flux.1 Depth/Canny (image-conditioned model or LoRA)",
    "flux-uso": "Flux.1 USO (style reference)",
    "flux-redux": "Flux.1 Redux (style model)", "flux2": "Flux.2", "chroma": "Chroma", "sd1": "Stable Diffusion 1.x (a UNet)",
    "sd2": "Stable Diffusion 2.x (a UNet)", "sdxl": "SDXL (a UNet)", "stable-cascade": "Stable Cascade",
    "svd": "Stable Video Diffusion (a UNet)", "auraflow": "AuraFlow", "qwen-image": "Qwen-Image", "cosmos": "Cosmos",
    "hunyuan-dit": "HunyuanDiT", "hunyuan-video": "HunyuanVideo", "hunyuan-image": "HunyuanImage", "hunyuan3d": "Hunyuan3D",
    "hidream": "HiDream", "hidream-e1": "HiDream-E1 (instruction editing)", "hidream-o1": "HiDream-O1",
    "mochi": "Mochi", "z-image": "Z-Image", "omnigen2": "OmniGen2", "ace-step": "ACE-Step (audio)",
    "stable-audio": "Stable Audio", "kandinsky": "Kandinsky", "ovis": "Ovis-Image", "longcat": "LongCat-Image",
    "anima": "Anima", "lotus": "Lotus (depth/normal estimation)", "ltx2": "LTX-2 (audio+video)",
    "ltx-guides": "LTX-Video image-to-video (guide frames)", "wan-5b": "Wan 2.2 TI2V-5B (its 16x VAE)",
    "clip-vision": "CLIP-vision image conditioning (as Wan 2.1 image-to-video uses)", "wan-vace": "Wan VACE",
    "wan-flf2v": "Wan first-last-frame-to-video", "wan-camera": "Wan Fun Camera", "wan-fun": "Wan Fun Control/Inpaint",
    "wan-s2v": "Wan 2.2 S2V (sound-to-video)", "wan-humo": "Wan HuMo", "wan-talk": "Wan InfiniteTalk",
    "wan-animate": "Wan Animate", "wan-tracks": "Wan ATI/Move (motion tracks)", "wan-scail": "Wan SCAIL",
    "wan-dancer": "Wan Dancer", "wan-ar": "Wan causal-forcing (autoregressive)", "bernini": "Bernini-R",
    "llm": "text generation (an LLM, not a diffusion model)",
}
# -- models that share a runnable family's file names or nodes but are not it (issue 23) --------
# Their workflows would otherwise pass for Qwen-Image, Chroma or Flux ones, or (when their loaders
# name nothing known) import as "unknown" although ditgraph cannot run them.
NAMES.update({
    "qwen-image-2.1": "Qwen-Image 2.1 (Qwen3-VL text encoder, its own VAE)", "krea2": "Krea 2",
    "qwen-image-layered": "Qwen-Image-Layered (RGBA layers)", "marigold": "Marigold v2 (depth/normal/albedo estimation)",
    "chroma-radiance": "Chroma Radiance (pixel space)", "ming": "Ming-Image", "boogu": "Boogu-Image", "lens": "Lens",
    "mage-flow": "Mage-Flow", "minimax-h3": "MiniMax H3", "newbie": "NewBie-Image", "pixeldit": "PixelDiT",
    "capybara": "Capybara", "joyimage": "JoyImage", "fibo": "FIBO", "moss": "MOSS-Image",
})
DISTINCT_MODEL_FILES: tuple[tuple[str, str], ...] = (
    ("qwen_image_2.1", "qwen-image-2.1"), ("qwen_image_layered", "qwen-image-layered"), ("radiance", "chroma-radiance"),
    ("krea2", "krea2"), ("ming_image", "ming"), ("boogu", "boogu"), ("lens_", "lens"), ("mage_flow", "mage-flow"),
    ("minimax_h3", "minimax-h3"), ("fasth3", "minimax-h3"), ("newbie", "newbie"), ("pixeldit", "pixeldit"),
    ("capybara", "capybara"), ("joyai_image", "joyimage"), ("fibo", "fibo"), ("moss_image", "moss"),
)
DISTINCT_VAE_FILES: tuple[tuple[str, str], ...] = (("marigold", "marigold"),)
DISTINCT_NODE_TYPES = {
    "TextEncodeQwenImage21": "qwen-image-2.1", "QwenImage21Cache": "qwen-image-2.1",
    "EmptyQwenImageLayeredLatentImage": "qwen-image-layered", "MarigoldV2PostProcess": "marigold",
    "ChromaRadianceOptions": "chroma-radiance", "TextEncodeMingImageEdit": "ming",
}
# variants that run as a family ditgraph runs once it has the capability (a Family attribute) they need
RUNS_AS = {"flux-kontext": ("flux", "reference_latents")}
# node types that need a capability (a Family attribute) of the family the workflow is for: without
# it the workflow is refused in one line ("Qwen-Image workflow needs a ControlNet ...")
NEEDS = {
    "ReferenceLatent": ("reference_latents", "reference images (in-context editing)"),
    "ControlNetApply": ("controlnet_class", "a ControlNet"),
    "ControlNetApplyAdvanced": ("controlnet_class", "a ControlNet"),
    "ControlNetApplySD3": ("controlnet_class", "a ControlNet"),
}
# substrings of model file names (lower case) -> family; the first match wins, so variants come first
MODEL_FILES: tuple[tuple[str, str], ...] = (
    *DISTINCT_MODEL_FILES,
    ("kontext", "flux-kontext"), ("flux1-fill", "flux-fill"), ("fill-dev", "flux-fill"), ("flux1-canny", "flux-canny"),
    ("flux1-depth-dev.", "flux-depth"), ("flux1-depth-dev-f", "flux-depth"), ("redux", "flux-redux"),
    ("flux2", "flux2"), ("flux-2", "flux2"), ("flux_2", "flux2"), ("flux3", "flux2"), ("chroma", "chroma"),
    ("flux", "flux"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"), ("pixart", "pixart"), ("sana", "sana"),
    ("lumina", "lumina2"), ("netayume", "lumina2"), ("aura", "auraflow"), ("qwen", "qwen-image"), ("cosmos", "cosmos"),
    ("hunyuan3d", "hunyuan3d"), ("hunyuan_video", "hunyuan-video"), ("hunyuanvideo", "hunyuan-video"),
    ("hunyuan_dit", "hunyuan-dit"), ("hunyuandit", "hunyuan-dit"), ("hunyuan", "hunyuan-image"),
    ("hidream_e1", "hidream-e1"), ("hidream-e1", "hidream-e1"), ("hidream_o1", "hidream-o1"), ("hidream-o1", "hidream-o1"),
    ("hidream", "hidream"),
    ("ti2v_5b", "wan-5b"), ("wan_animate", "wan-animate"), ("wan2", "wan"), ("wan_2", "wan"), ("wan21", "wan"),
    ("ltx-2", "ltx2"), ("ltx2", "ltx2"), ("ltx_2", "ltx2"), ("ltx", "ltx"), ("mochi", "mochi"), ("z_image", "z-image"),
    ("z-image", "z-image"), ("omnigen", "omnigen2"), ("ace_step", "ace-step"), ("stable_audio", "stable-audio"),
    ("stable_cascade", "stable-cascade"), ("cascade", "stable-cascade"), ("svd", "svd"), ("sd_xl", "sdxl"),
    ("sdxl", "sdxl"), ("v1-5", "sd1"), ("sd15", "sd1"), ("sd-v1", "sd1"), ("v2-1", "sd2"), ("kandinsky", "kandinsky"),
    ("ovis", "ovis"), ("longcat", "longcat"), ("zero123", "sd1"), ("anima", "anima"), ("lotus", "lotus"),
)
# VAE files that come with one family only (many names, such as ae.safetensors, say nothing)
VAE_FILES: tuple[tuple[str, str], ...] = (
    *DISTINCT_VAE_FILES,
    ("vae-ft-mse", "sd1"), ("kl-f8-anime", "sd1"), ("orangemix", "sd1"), ("sdxl_vae", "sdxl"), ("sdxl-vae", "sdxl"),
)
MODEL_INPUTS = {"ckpt_name", "unet_name", "model_name"}  # loader inputs that name the diffusion model
NODE_TYPES = {
    "WanImageToVideo": "wan", "WanVaceToVideo": "wan-vace", "WanFirstLastFrameToVideo": "wan-flf2v",
    "LTXVConditioning": "ltx",
    "LTXVImgToVideo": "ltx-guides", "LTXVImgToVideoInplace": "ltx-guides", "LTXVAddGuide": "ltx-guides",
    "EmptyLTXVLatentVideo": "ltx", "LTXAVTextEncoderLoader": "ltx2", "LTXVConcatAVLatent": "ltx2",
    "LTXVEmptyLatentAudio": "ltx2", "Wan22ImageToVideoLatent": "wan-5b", "CLIPVisionEncode": "clip-vision",
    "WanCameraImageToVideo": "wan-camera", "WanFunControlToVideo": "wan-fun", "Wan22FunControlToVideo": "wan-fun",
    "WanFunInpaintToVideo": "wan-fun", "WanSoundImageToVideo": "wan-s2v", "WanHuMoImageToVideo": "wan-humo",
    "WanInfiniteTalkToVideo": "wan-talk", "WanAnimate2ToVideo": "wan-animate", "WanTrackToVideo": "wan-tracks",
    "WanMoveTrackToVideo": "wan-tracks", "WanSCAILToVideo": "wan-scail", "WanDancerVideo": "wan-dancer",
    "ARVideoI2V": "wan-ar", "BerniniConditioning": "bernini", "TextGenerate": "llm", "EmptyCosmosLatentVideo": "cosmos",
    "CLIPTextEncodeHunyuanDiT": "hunyuan-dit", "EmptyAceStepLatentAudio": "ace-step", "EmptyLatentAudio": "stable-audio",
    "SVD_img2vid_Conditioning": "svd", "TextEncodeQwenImageEdit": "qwen-image", "TextEncodeQwenImageEditPlus": "qwen-image",
    "EmptyFlux2LatentImage": "flux2", "Flux2Scheduler": "flux2", "EmptyHunyuanImageLatent": "hunyuan-image",
    "CLIPTextEncodeSDXL": "sdxl", "CLIPTextEncodeSDXLRefiner": "sdxl", "EmptyMochiLatentVideo": "mochi",
    "StableCascade_EmptyLatentImage": "stable-cascade", "InstructPixToPixConditioning": "flux-depth",
    "StyleModelApply": "flux-redux", "USOStyleReference": "flux-uso", "LotusConditioning": "lotus", "QuadrupleCLIPLoader": "hidream", "EmptyHunyuanLatentVideo": None,
}
NODE_TYPES.update(DISTINCT_NODE_TYPES)
CLIP_TYPES = {
    "sd3": "sd3", "flux": "flux", "pixart": "pixart", "chroma": "chroma", "hidream": "hidream", "qwen_image": "qwen-image",
    "wan": "wan", "ltxv": "ltx", "cosmos": "cosmos", "hunyuan_video": "hunyuan-video", "mochi": "mochi", "sdxl": "sdxl",
    "stable_cascade": "stable-cascade", "omnigen2": "omnigen2", "ace": "ace-step", "stable_audio": "stable-audio",
    "hunyuan_image": "hunyuan-image", "flux2": "flux2", "ovis": "ovis", "lumina2": "lumina2", "stable_diffusion": "sd1",
}
CLIP_LOADERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader"}
# node types used by many families: they refine a family found otherwise, never name one alone
# (an LLM node names "llm" alone only in a workflow without a diffusion sampler)
REFINE_ONLY = {"clip-vision"}
SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}


def name_of(family: str) -> str:
    return NAMES.get(family, family)


def _file_family(filename: str, patterns: tuple[tuple[str, str], ...] = MODEL_FILES) -> str | None:
    lowered = filename.lower().replace("\\", "/").rsplit("/", 1)[-1]
    return next((key for pattern, key in patterns if pattern in lowered), None)


def detect(api: dict[str, dict]) -> dict[str, str]:
    """Family -> the evidence for it. Model (and VAE) files decide; node types only refine a family
    ditgraph runs into a variant it does not (Flux.1 + ReferenceLatent is Kontext); the CLIP
    loader's type counts only when nothing else tells."""
    files: dict[str, str] = {}
    nodes: dict[str, str] = {}
    clip: dict[str, str] = {}
    for raw in api.values():
        kind, inputs = raw.get("class_type"), raw.get("inputs") or {}
        for name in sorted(MODEL_INPUTS & set(inputs)):
            family = _file_family(inputs[name]) if isinstance(inputs[name], str) else None
            if family:
                files.setdefault(family, f"its model file {inputs[name]!r}")
        vae = inputs.get("vae_name")
        if isinstance(vae, str) and _file_family(vae, VAE_FILES):
            files.setdefault(_file_family(vae, VAE_FILES), f"its VAE file {vae!r}")
        if NODE_TYPES.get(kind):
            nodes.setdefault(NODE_TYPES[kind], f"its {kind} node")
        if kind in CLIP_LOADERS and isinstance(inputs.get("type"), str) and CLIP_TYPES.get(inputs["type"]):
            clip.setdefault(CLIP_TYPES[inputs["type"]], f"its CLIP loader of type {inputs['type']!r}")
    if any(not runnable(f) for f in files):
        return files
    if "llm" in nodes and (files or any(raw.get("class_type") in SAMPLERS for raw in api.values())):
        del nodes["llm"]  # an LLM that writes the prompt of a diffusion workflow
    if not files and set(nodes) <= REFINE_ONLY:
        nodes = {}
    nodes = dict(sorted(nodes.items(), key=lambda item: item[0] in REFINE_ONLY))  # the specific variant first
    return {**files, **nodes} or clip


def runnable(name: str) -> bool:
    """Whether app.models.families knows this family, or it is a variant (RUNS_AS) of one that has
    the capability the variant needs (so its workflows can run here)."""
    return family_of(name) is not None


def family_of(name: str):
    """The app.models.families Family a detected key runs as, or None when ditgraph cannot run it."""
    if name in FAMILIES:
        return FAMILIES[name]
    base, capability = RUNS_AS.get(name, (None, ""))
    family = FAMILIES.get(base)
    return family if family is not None and getattr(family, capability, None) else None


def check(api: dict[str, dict]) -> dict[str, str]:
    """The detected families; raises ComfyImportError (one line) when one of them cannot run here,
    or when a node needs a capability the family lacks (a ControlNet, reference images)."""
    found = detect(api)
    refused = [key for key in found if not runnable(key)]
    if refused:
        names = " + ".join(name_of(f) for f in refused)
        evidence = "; ".join(found[f] for f in refused)
        can = ", ".join(name_of(f) for f in FAMILIES if f in NAMES)
        raise ComfyImportError(f"{names} workflow (from {evidence}): ditgraph runs {can}, not {names}")
    for key in found:
        for node_id, raw in sorted(api.items(), key=lambda item: str(item[0])):
            capability, what = NEEDS.get(raw.get("class_type"), (None, ""))
            if capability and not getattr(family_of(key), capability, None):
                raise ComfyImportError(f"{name_of(key)} workflow needs {what} (node {node_id}, {raw['class_type']}): "
                                       f"ditgraph's {name_of(key)} has no support for it")
    return found


def summary(api: dict[str, Any]) -> str:
    """One family for reports: the first one that cannot run here, else the first detected, else 'unknown'."""
    found = detect(api)
    return next((f for f in found if not runnable(f)), next(iter(found), "unknown"))
