"""Per-family facts: which classes, latent layout, time convention, defaults, text encoders.

A *family* is a model architecture plus its conventions. Everything the loaders, text
encoders, samplers and latent nodes need to know about one is here, so adding a family is
one entry (plus its text-encoding and model-call code).

Time conventions (``prediction``), all mapped to the engine's flow-matching convention
x_s = (1 - s) x0 + s noise, velocity v = noise - x0:
  "flow"          the transformer takes timestep s*1000 (Flux: s) and predicts v
  "flow_reversed" Lumina 2: timestep 1 - s, predicts x0 - noise (= -v)
  "eps"           PixArt: a discrete-time epsilon model (VP); s is mapped to the VE sigma
                  s/(1-s), then to its (fractional) training timestep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    transformer_class: str
    pipeline_class: str | None
    prediction: str  # "flow" | "flow_reversed" | "eps"
    latent_channels: int
    vae_factor: int
    text_slots: tuple[str, ...]  # text encoders the family's conditioning uses, in order
    default_scheduler: str = "shifted"
    default_shift: float = 3.0
    default_steps: int = 28
    default_cfg: float = 4.5
    default_size: int = 1024
    packed: bool = False  # Flux: 2x2 latent patches become tokens outside the transformer
    batch_cfg: bool = True  # evaluate cond+uncond as one batch (as the family's pipeline does)
    cfg_renorm: bool = False  # Lumina 2: rescale the guided prediction to the conditional norm
    distilled_guidance: float | None = None  # Flux-dev's guidance embedding default
    vae_class: str = "AutoencoderKL"
    extras: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("shapes-dit", "SD3Transformer2DModel", None, "flow", 4, 8, ("minilm",),
               default_shift=3.0, default_steps=28, default_cfg=4.0, default_size=128),
        Family("sd3", "SD3Transformer2DModel", "StableDiffusion3Pipeline", "flow", 16, 8, ("clip_l", "clip_g", "t5"),
               default_shift=3.0, default_cfg=7.0),
        Family("flux", "FluxTransformer2DModel", "FluxPipeline", "flow", 16, 8, ("clip_l", "t5"),
               default_scheduler="dynamic", default_cfg=1.0, packed=True, distilled_guidance=3.5),
        Family("pixart", "PixArtTransformer2DModel", "PixArtSigmaPipeline", "eps", 4, 8, ("t5",),
               default_scheduler="discrete", default_shift=1.0, default_steps=20),
        Family("sana", "SanaTransformer2DModel", "SanaPipeline", "flow", 32, 32, ("gemma",),
               default_shift=3.0, default_steps=20, vae_class="AutoencoderDC"),
        Family("lumina2", "Lumina2Transformer2DModel", "Lumina2Pipeline", "flow_reversed", 16, 8, ("gemma",),
               default_shift=6.0, default_steps=30, default_cfg=4.0,
               batch_cfg=False, cfg_renorm=True),
    )
}

# Which diffusers pipeline component holds which text-encoder slot, per family.
PIPELINE_TEXT_SLOTS: dict[str, dict[str, str]] = {
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"},
    "flux": {"clip_l": "text_encoder", "t5": "text_encoder_2"},
    "pixart": {"t5": "text_encoder"},
    "sana": {"gemma": "text_encoder"},
    "lumina2": {"gemma": "text_encoder"},
    "shapes-dit": {"minilm": "text_encoder"},
}

CLASS_TO_FAMILY = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
    "Lumina2Transformer2DModel": "lumina2",
}
PIPELINE_TO_FAMILY = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "PixArtSigmaPipeline": "pixart",
    "PixArtAlphaPipeline": "pixart",
    "SanaPipeline": "sana",
    "Lumina2Pipeline": "lumina2",
    "Lumina2Text2ImgPipeline": "lumina2",
}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None


def detect_folder_family(folder: str | Path) -> str:
    """The family of a model folder: a ditgraph.json manifest, a pipeline's model_index.json,
    or a transformer component folder's config.json (by ``_class_name``)."""
    folder = Path(folder)
    if (folder / "ditgraph.json").is_file():
        manifest = read_json(folder / "ditgraph.json")
        family = manifest.get("family")
        if family not in FAMILIES:
            raise ValueError(f"{folder / 'ditgraph.json'}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
        return family
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json")
        name = index.get("_class_name", "")
        if name in PIPELINE_TO_FAMILY:
            return PIPELINE_TO_FAMILY[name]
        if (folder / "transformer" / "config.json").is_file():
            return detect_folder_family(folder / "transformer")
        raise ValueError(f"{folder}: pipeline {name!r} is not a supported family "
                         f"(supported: {', '.join(sorted(PIPELINE_TO_FAMILY))})")
    if (folder / "transformer" / "config.json").is_file():
        return detect_folder_family(folder / "transformer")
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
        name = config.get("_class_name", "")
        if name == "SD3Transformer2DModel" and config.get("joint_attention_dim") == 384 == config.get("pooled_projection_dim"):
            return "shapes-dit"  # MiniLM-sized text inputs: the bundled model (even before its manifest is written)
        if name in CLASS_TO_FAMILY:
            return CLASS_TO_FAMILY[name]
        raise ValueError(f"{folder / 'config.json'}: _class_name {name!r} is not a supported transformer "
                         f"(supported: {', '.join(CLASS_TO_FAMILY)})")
    raise ValueError(f"{folder}: not a model folder (expected ditgraph.json, model_index.json, "
                     "transformer/config.json or config.json)")


def detect_state_dict_family(keys: list[str]) -> str | None:
    """Guess a family from the tensor names of a single-file checkpoint (original or diffusers naming)."""
    joined = "\n".join(keys[:4000])
    if "double_blocks." in joined or "single_transformer_blocks." in joined or "single_blocks." in joined:
        return "flux"
    if "joint_blocks." in joined or "context_embedder." in joined and "pos_embed" in joined:
        return "sd3"
    if "cap_embedder." in joined or "noise_refiner." in joined:
        return "lumina2"
    if "caption_projection." in joined and "adaln_single." in joined:
        return "sana" if "conv_inverted" in joined or "glumb" in joined.lower() else "pixart"
    return None


# Flux/SD3.5-style resolution-dependent shift: mu grows linearly with the token count.
DYNAMIC_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def dynamic_mu(image_seq_len: int, config: dict | None = None) -> float:
    c = {**DYNAMIC_SHIFT_DEFAULTS, **{k: v for k, v in (config or {}).items() if k in DYNAMIC_SHIFT_DEFAULTS and v is not None}}
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return image_seq_len * slope + c["base_shift"] - slope * c["base_image_seq_len"]
