"""Sampling settings that follow the model: family defaults, then its variant, then its manifest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.core.context import current
from app.models.families.variants import Variant, detect_variant, guidance_warning
from app.models.handles import ModelHandle

log = logging.getLogger(__name__)


def model_variant(model: ModelHandle) -> Variant | None:
    """The few-step / guidance-distilled variant of ``model`` (None: the family's base model)."""
    manifest = {"variant": model.defaults["variant"], "defaults": model.defaults} if model.defaults.get("variant") else None
    return detect_variant(model.family, dict(model.config), model.scheduler_config, model.source, manifest,
                          model.pipeline)


def checkpoint_variant(folder: str | Path) -> Variant | None:
    """The variant of a checkpoint *folder* from its configs alone (no weights read): what
    validation knows before a run. Single files name no config: None."""
    from app.models import families

    folder = Path(folder)
    if not folder.is_dir():
        return None
    family = families.detect_folder_family(folder)
    read = families.read_json
    configs = [folder / "transformer" / "config.json", folder / "config.json"]
    config = next((read(c) for c in configs if c.is_file()), {})
    manifest = folder / "ditgraph.json"
    return detect_variant(family, config, families.scheduler_config(folder), str(folder),
                          read(manifest) if manifest.is_file() else None, families.pipeline_class(folder))


def sampling_defaults(model: ModelHandle) -> dict[str, Any]:
    """steps, cfg, sampler, scheduler (and guidance_distilled, variant, guidance when known) for
    ``model``: what its pipeline would use, so a variant such as Flux-schnell gets 4 steps."""
    info = model.info
    out: dict[str, Any] = {"steps": info.default_steps, "cfg": info.default_cfg, "sampler": "euler",
                           "scheduler": "auto", "guidance_distilled": False}
    variant = model_variant(model)
    if variant is not None:
        out.update(variant.defaults())
    out.update({k: v for k, v in model.defaults.items() if k in out or k in ("guidance", "variant")})
    return out


def warn_guidance(model: ModelHandle, cfg: float, has_negative: bool) -> str | None:
    """Warn (log + a run "warning" event) when CFG is used on a guidance-distilled model."""
    message = guidance_warning(model_variant(model), cfg, has_negative)
    if message is None and sampling_defaults(model).get("guidance_distilled") and cfg > 1.0 and has_negative:
        message = f"cfg {cfg:g} on a guidance-distilled model: use cfg 1 (or no negative)"
    if message:
        log.warning(message)
        ctx = current()
        ctx.emit({"type": "warning", "run_id": ctx.run_id, "node": ctx.node_id, "message": message})
    return message
