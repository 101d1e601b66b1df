"""Model families: one module per family, discovered and registered here.

A *family* is a model architecture plus its conventions: its diffusers classes, latent
layout, VAE factors, time convention, text-encoding recipe, native forward kwargs, sampling
defaults, detection hints and LoRA key maps. :class:`base.Family` documents every fact and
behaviour; each module in this package subclasses it and exposes one instance as ``FAMILY``.
Code outside this package never branches on a family's name: it asks ``get(name)`` (or
``handle.info``) for the fact or behaviour it needs.

Adding a family
---------------
1. Create ``app/models/families/<name>.py`` with a ``Family`` subclass:
   - facts: ``name``, ``transformer_class``, ``pipeline_class`` (+ ``pipeline_aliases``),
     ``vae_class``, ``prediction`` ("flow" | "flow_reversed" | "eps" | "v"), ``latent_channels``,
     ``vae_factor``, ``pack``; video families set ``video = True``, ``temporal_factor``,
     ``default_frames``/``default_fps`` (latents become (B, C, F, H, W)); ``text_slots`` and
     ``pipeline_text_slots`` (slot -> pipeline component), defaults (``default_steps``,
     ``default_shift``, ``default_cfg``, ``default_scheduler``, ``default_size``), ``batch_cfg``;
   - behaviours: ``native_kwargs`` (the transformer call), ``encode_text`` (and
     ``encode_negative`` with ``negative_differs`` if negatives differ); override
     ``timestep``, ``unpack_output``, ``normalise_latents``/``denormalise_latents`` (VAE
     statistics), ``matches_state_dict``, ``convert_lora``/``lora_name_table``,
     ``image_to_video_condition``, ``pick_transformer`` only where the defaults do not fit;
     editing models set ``reference_latents`` (how many input images' latents they take as extra
     tokens, read with ``self.references(cond)``) and ``edit_modes`` with ``encode_text_with_images`` /
     ``reference_images`` (the TextEncodeImageEdit node; Qwen-Image-Edit);
   - ``FAMILY = YourFamily()`` at the bottom.
2. Set ``detect_priority`` above a family whose detection yours refines (shapes-dit > sd3).
3. Add a parity test against the family's diffusers pipeline with a tiny random model
   (tests/models/test_parity.py, test_video_parity.py); tests/models/test_families.py checks
   the registration.
Nothing else changes: loaders, text encoders, samplers and latent nodes read the family.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from app.models.families.base import Family

__all__ = ["FAMILIES", "Family", "get", "detect_folder_family", "detect_config_family", "detect_state_dict_family",
           "families_for_text_slots", "dynamic_mu"]


def _discover(package: str = __name__, path: list[str] | None = None) -> dict[str, Family]:
    """Every module of ``package`` that defines ``FAMILY``, by name (duplicates are errors)."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__ if path is None else path), key=lambda m: m.name):
        if info.name == "base":
            continue
        family = getattr(importlib.import_module(f"{package}.{info.name}"), "FAMILY", None)
        if family is None:
            continue
        if family.name in found:
            raise RuntimeError(f"family {family.name!r} is defined twice ({info.name})")
        found[family.name] = family
    return found


FAMILIES: dict[str, Family] = _discover()
_BY_PRIORITY = sorted(FAMILIES.values(), key=lambda f: -f.detect_priority)
_IMAGE_VAE = Family()  # unknown VAE classes: scale and shift from the VAE's config


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


def scheduler_config(folder: str | Path) -> dict:
    """A model folder's ``scheduler/scheduler_config.json`` ({} when it has none)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    return read_json(path) if path.is_file() else {}


def pipeline_class(folder: str | Path) -> str:
    """The diffusers pipeline class a folder's ``model_index.json`` names ("" when it has none)."""
    index = Path(folder) / "model_index.json"
    return str(read_json(index).get("_class_name") or "") if index.is_file() else ""


def detect_config_family(config: dict) -> str | None:
    """The family of a transformer ``config.json`` (None when no family claims it)."""
    return next((f.name for f in _BY_PRIORITY if f.matches_config(config)), None)


def detect_pipeline_family(class_name: str) -> str | None:
    """The family of a pipeline class name from ``model_index.json``."""
    return next((f.name for f in _BY_PRIORITY if f.matches_pipeline(class_name)), None)


def detect_folder_family(folder: str | Path) -> str:
    """The family of a model folder: a ditgraph.json manifest, a pipeline's model_index.json,
    or a transformer component folder's config.json (by ``_class_name``)."""
    folder = Path(folder)
    if (folder / "ditgraph.json").is_file():
        family = read_json(folder / "ditgraph.json").get("family")
        if family not in FAMILIES:
            raise ValueError(f"{folder / 'ditgraph.json'}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
        return family
    if (folder / "model_index.json").is_file():
        name = read_json(folder / "model_index.json").get("_class_name", "")
        family = detect_pipeline_family(name)
        if family:
            return family
        if (folder / "transformer" / "config.json").is_file():
            return detect_folder_family(folder / "transformer")
        supported = sorted(p for f in FAMILIES.values() for p in (f.pipeline_class, *f.pipeline_aliases) if p)
        raise ValueError(f"{folder}: pipeline {name!r} is not a supported family (supported: {', '.join(supported)})")
    if (folder / "transformer" / "config.json").is_file():
        return detect_folder_family(folder / "transformer")
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
        family = detect_config_family(config)
        if family:
            return family
        supported = sorted({f.transformer_class for f in FAMILIES.values()})
        raise ValueError(f"{folder / 'config.json'}: _class_name {config.get('_class_name', '')!r} is not a supported "
                         f"transformer (supported: {', '.join(supported)})")
    raise ValueError(f"{folder}: not a model folder (expected ditgraph.json, model_index.json, "
                     "transformer/config.json or config.json)")


def detect_state_dict_family(keys: list[str]) -> str | None:
    """Guess a family from the tensor names of a single-file checkpoint (original or diffusers naming)."""
    joined = "\n".join(keys[:4000])
    return next((f.name for f in _BY_PRIORITY if f.matches_state_dict(joined)), None)


def for_vae(class_name: str) -> Family:
    """The family whose latent conventions a VAE class follows (the base ones for shared classes)."""
    return next((f for f in _BY_PRIORITY if f.vae_class == class_name), _IMAGE_VAE)


def families_for_text_slots(slots: set[str]) -> list[str]:
    """Families whose text encoders are exactly (up to optional slots) ``slots``."""
    return [f.name for f in _BY_PRIORITY if f.guessed_from_text
            and set(f.text_slots) - set(f.optional_text_slots) <= slots <= set(f.text_slots)]


# Flux/SD3.5-style resolution-dependent shift: mu grows linearly with the token count.
DYNAMIC_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def dynamic_mu(image_seq_len: int, config: dict | None = None) -> float:
    c = {**DYNAMIC_SHIFT_DEFAULTS, **{k: v for k, v in (config or {}).items() if k in DYNAMIC_SHIFT_DEFAULTS and v is not None}}
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return image_seq_len * slope + c["base_shift"] - slope * c["base_image_seq_len"]
