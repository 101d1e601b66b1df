"""Few-step and guidance-distilled variants of the families, detected from a checkpoint's configs.

A variant is a checkpoint of a family whose weights were distilled for few steps and/or for
guidance: it shares the family's classes and model call but samples with other settings. The
facts here (detection and the settings its pipeline uses) give the defaults that follow the
model (``app.models.sampling.sampling_defaults``) and the warning when CFG is used on a
guidance-distilled model. Detection reads only configs, the pipeline class (model_index.json) and
the checkpoint's name:

- Flux.1-schnell: a Flux transformer without ``guidance_embeds``; 4 steps, no CFG, shift 1.
- Flux.1-dev: ``guidance_embeds``; guidance is embedded (FluxGuidance), not CFG.
- SD3.5-large-turbo: an SD3 checkpoint named "*turbo*"; 4 steps, guidance 0 (no CFG).
- PixArt-LCM: an ``LCMScheduler`` scheduler config (or "*lcm*" name); 4 steps, LCM sampling.
- Sana-Sprint: a Sana transformer with ``guidance_embeds`` (or an ``SCMScheduler``); 1-4 steps of
  sCM/TrigFlow sampling, embedded guidance 4.5 (x ``guidance_embeds_scale``), no CFG.
- Qwen-Image-Edit-2509/2511: a QwenImageEditPlusPipeline folder (or single file whose config
  folder is one), a transformer with ``zero_cond_t`` (2511), or a name with "edit" and "2509",
  "2511" or "plus"; Qwen-Image-Edit: a QwenImageEditPipeline folder or a name with "edit". Both
  sample as Qwen-Image does (50 steps, true CFG 4); the variant picks the text recipe of
  TextEncodeImageEdit's mode "auto" (app/models/families/qwen_image.py).
- HiDream-I1-Dev / -Fast: named "*dev*" / "*fast*" (the name wins: "*full*" is the base model),
  else a ``FlowMatchLCMScheduler`` (or the older Euler) scheduler, shift 6 Dev, else Fast; 28 / 16
  steps of LCM-style sampling over the shifted Euler timesteps, no CFG, shift 6 / 3.
- Any checkpoint whose ditgraph.json says ``"variant"`` (e.g. the shapes-dit-turbo student).

One entry per variant in :data:`VARIANTS`, keyed by family name (a lookup, not a branch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Variant:
    """A distilled checkpoint kind and the settings its pipeline samples with."""

    name: str
    matches: Callable[[dict, dict, str], bool] = field(compare=False, repr=False)
    steps: int = 28
    cfg: float = 1.0
    sampler: str = "euler"
    scheduler: str = "auto"
    guidance_distilled: bool = True  # CFG (cfg > 1 with a negative) is wrong for it
    embedded_guidance: float | None = None  # the guidance-embedding value its pipeline uses
    pipelines: tuple[str, ...] = ()  # model_index.json pipeline classes that are this variant
    shift: float | None = None  # its flow shift, above the scheduler config's (a single file's config
    # folder may be another variant's)

    def defaults(self) -> dict[str, Any]:
        """Sampling defaults in the manifest's ``defaults`` vocabulary."""
        out = {"steps": self.steps, "cfg": self.cfg, "sampler": self.sampler, "scheduler": self.scheduler,
               "guidance_distilled": self.guidance_distilled, "variant": self.name}
        if self.embedded_guidance is not None:
            out["guidance"] = self.embedded_guidance
        if self.shift is not None:
            out["shift"] = self.shift
        return out


def _named(*words: str) -> Callable[[dict, dict, str], bool]:
    return lambda _config, _scheduler, name: any(w in Path(name).name.lower() for w in words)


def _scheduler_class(*names: str) -> Callable[[dict, dict, str], bool]:
    return lambda _config, scheduler, _name: scheduler.get("_class_name") in names


def _qwen_edit_plus(config: dict, scheduler: dict, name: str) -> bool:
    return bool(config.get("zero_cond_t")) or (_named("edit")(config, scheduler, name)
                                               and _named("2509", "2511", "plus")(config, scheduler, name))


def _hidream(kind: str) -> Callable[[dict, dict, str], bool]:
    """HiDream-I1 Dev/Fast: by name first (full, dev or fast), else by the distilled scheduler's shift."""
    def matches(_config: dict, scheduler: dict, name: str) -> bool:
        named = [k for k in ("full", "dev", "fast") if k in Path(name).name.lower()]
        if named:
            return named[0] == kind
        if scheduler.get("_class_name") not in ("FlowMatchLCMScheduler", "FlowMatchEulerDiscreteScheduler"):
            return False  # Full ships a flow UniPC scheduler
        return kind == ("dev" if float(scheduler.get("shift") or 1.0) >= 5.0 else "fast")

    return matches


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "flux": (
        Variant("flux-schnell", lambda config, _s, _n: not config.get("guidance_embeds", False), steps=4),
        Variant("flux-dev", lambda config, _s, _n: bool(config.get("guidance_embeds", False)), steps=28,
                embedded_guidance=3.5),
    ),
    "sd3": (Variant("sd3.5-turbo", _named("turbo"), steps=4, scheduler="turbo"),),
    "pixart": (Variant("pixart-lcm", lambda c, s, n: _scheduler_class("LCMScheduler")(c, s, n) or _named("lcm")(c, s, n),
                       steps=4, sampler="lcm", scheduler="lcm"),),
    "qwen-image": (  # edit models: the pipeline's own settings (Qwen-Image's), not distilled
        Variant("qwen-image-edit-plus", _qwen_edit_plus, steps=50, cfg=4.0, guidance_distilled=False,
                pipelines=("QwenImageEditPlusPipeline",)),
        Variant("qwen-image-edit", _named("edit"), steps=50, cfg=4.0, guidance_distilled=False,
                pipelines=("QwenImageEditPipeline", "QwenImageEditInpaintPipeline")),
    ),
    "hidream": (Variant("hidream-dev", _hidream("dev"), steps=28, sampler="lcm", scheduler="turbo", shift=6.0),
                Variant("hidream-fast", _hidream("fast"), steps=16, sampler="lcm", scheduler="turbo", shift=3.0)),
    "sana": (Variant("sana-sprint", lambda c, s, n: bool(c.get("guidance_embeds")) or _scheduler_class("SCMScheduler")(c, s, n),
                     steps=2, sampler="lcm", scheduler="trigflow", embedded_guidance=4.5),),
}


def detect_variant(family: str, config: dict, scheduler_config: dict, name: str = "",
                   manifest: dict | None = None, pipeline: str = "") -> Variant | None:
    """The variant of a checkpoint of ``family`` (None: the family's base model).

    ``config`` is the transformer config, ``scheduler_config`` the scheduler's, ``name`` the
    checkpoint's path or file name, ``pipeline`` its model_index.json class (if any); a
    ditgraph.json ``manifest`` may name the variant itself (its ``defaults`` then give the settings)."""
    if manifest and manifest.get("variant"):
        return Variant(str(manifest["variant"]), lambda *_: True, **_manifest_settings(manifest))
    for variant in VARIANTS.get(family, ()):
        if (pipeline and pipeline in variant.pipelines) or variant.matches(
                dict(config or {}), dict(scheduler_config or {}), str(name or "")):
            return variant
    return None


def _manifest_settings(manifest: dict) -> dict:
    defaults = manifest.get("defaults") or {}
    keys = ("steps", "cfg", "sampler", "scheduler", "guidance_distilled", "embedded_guidance", "shift")
    return {k: defaults[k] for k in keys if k in defaults}


def guidance_warning(variant: Variant | None, cfg: float, has_negative: bool) -> str | None:
    """Why ``cfg`` is wrong for a guidance-distilled model, or None (a validation warning)."""
    if variant is None or not variant.guidance_distilled or cfg <= 1.0 or not has_negative:
        return None
    hint = f" (its guidance is embedded: set it on the conditioning, default {variant.embedded_guidance})" \
        if variant.embedded_guidance is not None else ""
    return (f"cfg {cfg:g} on {variant.name}, a guidance-distilled model: CFG doubles the cost and degrades "
            f"the image; use cfg 1 (or no negative){hint}")
