"""Which model family a ComfyUI workflow is for, so one ditgraph cannot run is refused in one line.

Evidence, most specific first: the model files its loaders name, node types that exist for
one family only, and (only when nothing else tells) the ``type`` of its CLIP loaders. A
family is runnable when app.models.families knows it; the keys here are those names. Variants
of a runnable family that need conditioning ditgraph lacks (Flux Fill/Kontext, Wan VACE, Wan 2.1
CLIP-vision I2V, LTX-2 audio+video, ...) have keys of their own that it does not know.
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
    "hidream": "HiDream", "mochi": "Mochi", "z-image": "Z-Image", "omnigen2": "OmniGen2", "ace-step": "ACE-Step (audio)",
    "stable-audio": "Stable Audio", "kandinsky": "Kandinsky", "ovis": "Ovis-Image", "longcat": "LongCat-Image",
    "anima": "Anima", "lotus": "Lotus (depth/normal estimation)", "ltx2": "LTX-2 (audio+video)",
    "ltx-guides": "LTX-Video image-to-video (guide frames)", "wan-5b": "Wan 2.2 TI2V-5B (its 16x VAE)",
    "clip-vision": "CLIP-vision image conditioning (as Wan 2.1 image-to-video uses)", "wan-vace": "Wan VACE",
    "wan-flf2v": "Wan first-last-frame-to-video", "wan-camera": "Wan Fun Camera", "wan-fun": "Wan Fun Control/Inpaint",
    "wan-s2v": "Wan 2.2 S2V (sound-to-video)", "wan-humo": "Wan HuMo", "wan-talk": "Wan InfiniteTalk",
    "wan-animate": "Wan Animate", "wan-tracks": "Wan ATI/Move (motion tracks)", "wan-scail": "Wan SCAIL",
    "wan-dancer": "Wan Dancer", "wan-ar": "Wan causal-forcing (autoregressive)", "bernini": "Bernini-R",
    "llm": "text generation (an LLM, not a diffusion model)",
    # Flux.2 and the models that share its VAE and latents (EmptyFlux2LatentImage) but not its transformer
    "flux2-klein": "Flux.2 [klein]", "flux2-kv": "Flux.2 [klein] KV (cached reference-image attention)",
    "flux3": "Flux.3", "ernie-image": "ERNIE-Image", "ideogram4": "Ideogram 4", "moss-image": "MOSS-Image",
}
# substrings of model file names (lower case) -> family; the first match wins, so variants come first
MODEL_FILES: tuple[tuple[str, str], ...] = (
    ("kontext", "flux-kontext"), ("flux1-fill", "flux-fill"), ("fill-dev", "flux-fill"), ("flux1-canny", "flux-canny"),
    ("flux1-depth-dev.", "flux-depth"), ("flux1-depth-dev-f", "flux-depth"), ("redux", "flux-redux"),
    ("flux2", "flux2"), ("flux-2", "flux2"), ("flux_2", "flux2"), ("flux3", "flux3"), ("ernie-image", "ernie-image"),
    ("ideogram", "ideogram4"), ("moss_image", "moss-image"), ("chroma", "chroma"),
    ("flux", "flux"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"), ("pixart", "pixart"), ("sana", "sana"),
    ("lumina", "lumina2"), ("netayume", "lumina2"), ("aura", "auraflow"), ("qwen", "qwen-image"), ("cosmos", "cosmos"),
    ("hunyuan3d", "hunyuan3d"), ("hunyuan_video", "hunyuan-video"), ("hunyuanvideo", "hunyuan-video"),
    ("hunyuan_dit", "hunyuan-dit"), ("hunyuandit", "hunyuan-dit"), ("hunyuan", "hunyuan-image"), ("hidream", "hidream"),
    ("ti2v_5b", "wan-5b"), ("wan_animate", "wan-animate"), ("wan2", "wan"), ("wan_2", "wan"), ("wan21", "wan"),
    ("ltx-2", "ltx2"), ("ltx2", "ltx2"), ("ltx_2", "ltx2"), ("ltx", "ltx"), ("mochi", "mochi"), ("z_image", "z-image"),
    ("z-image", "z-image"), ("omnigen", "omnigen2"), ("ace_step", "ace-step"), ("stable_audio", "stable-audio"),
    ("stable_cascade", "stable-cascade"), ("cascade", "stable-cascade"), ("svd", "svd"), ("sd_xl", "sdxl"),
    ("sdxl", "sdxl"), ("v1-5", "sd1"), ("sd15", "sd1"), ("sd-v1", "sd1"), ("v2-1", "sd2"), ("kandinsky", "kandinsky"),
    ("ovis", "ovis"), ("longcat", "longcat"), ("zero123", "sd1"), ("anima", "anima"), ("lotus", "lotus"),
)
# VAE files that come with one family only (many names, such as ae.safetensors, say nothing)
VAE_FILES: tuple[tuple[str, str], ...] = (
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
    "StyleModelApply": "flux-redux", "USOStyleReference": "flux-uso", "ReferenceLatent": "flux-kontext",
    "FluxKontextMultiReferenceLatentMethod": "flux-kontext", "FluxKVCache": "flux2-kv", "LotusConditioning": "lotus", "QuadrupleCLIPLoader": "hidream", "EmptyHunyuanLatentVideo": None,
}
CLIP_TYPES = {
    "sd3": "sd3", "flux": "flux", "pixart": "pixart", "chroma": "chroma", "hidream": "hidream", "qwen_image": "qwen-image",
    "wan": "wan", "ltxv": "ltx", "cosmos": "cosmos", "hunyuan_video": "hunyuan-video", "mochi": "mochi", "sdxl": "sdxl",
    "stable_cascade": "stable-cascade", "omnigen2": "omnigen2", "ace": "ace-step", "stable_audio": "stable-audio",
    "hunyuan_image": "hunyuan-image", "flux2": "flux2", "ovis": "ovis", "lumina2": "lumina2", "stable_diffusion": "sd1",
    "flux3": "flux3", "ideogram4": "ideogram4", "moss_image": "moss-image",
}
CLIP_LOADERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader"}
# node types used by many families: they refine a family found otherwise, never name one alone
# (an LLM node names "llm" alone only in a workflow without a diffusion sampler)
REFINE_ONLY = {"clip-vision"}
SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}
KONTEXT = "flux-kontext"  # what ReferenceLatent names on Flux.1 (and on models that take no reference images)


def name_of(family: str) -> str:
    return NAMES.get(family, family)


def _file_family(filename: str, patterns: tuple[tuple[str, str], ...] = MODEL_FILES) -> str | None:
    lowered = filename.lower().replace("\\", "/").rsplit("/", 1)[-1]
    return next((key for pattern, key in patterns if pattern in lowered), None)


def file_family(filename: str) -> str | None:
    """The family a model file's name says (None: it says nothing)."""
    return _file_family(filename)


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
    if KONTEXT in nodes and any(_takes_references(f) for f in {*files, *nodes} - {"flux", KONTEXT}):
        del nodes[KONTEXT]  # ReferenceLatent on a model that takes reference images itself (Flux.2): its editing
    nodes = dict(sorted(nodes.items(), key=lambda item: item[0] in REFINE_ONLY))  # the specific variant first
    return {**files, **nodes} or clip


def _takes_references(name: str) -> bool:
    return name in FAMILIES and bool(FAMILIES[name].reference_latents)


def runnable(name: str) -> bool:
    """Whether app.models.families knows this family (so its workflows can run here)."""
    return name in FAMILIES


def check(api: dict[str, dict]) -> dict[str, str]:
    """The detected families; raises ComfyImportError (one line) when one of them cannot run here."""
    found = detect(api)
    refused = [key for key in found if not runnable(key)]
    if refused:
        names = " + ".join(name_of(f) for f in refused)
        evidence = "; ".join(found[f] for f in refused)
        can = ", ".join(name_of(f) for f in FAMILIES if f in NAMES)
        raise ComfyImportError(f"{names} workflow (from {evidence}): ditgraph runs {can}, not {names}")
    return found


def summary(api: dict[str, Any]) -> str:
    """One family for reports: the first one that cannot run here, else the first detected, else 'unknown'."""
    found = detect(api)
    return next((f for f in found if not runnable(f)), next(iter(found), "unknown"))
