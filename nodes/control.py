"""ControlNet-style injectors: a CONTROL (a diffusers ControlNet, or a condition-token adapter)
applied to a MODEL with a control image. The result is a MODEL view; the control acts only
while a sampler runs (app/patches/controlnet.py, app/patches/condition_tokens.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from app import paths
from app.context import current
from app.models import resolve_device, resolve_dtype
from app.patches.condition_tokens import ConditionAdapter, ConditionTokenPatch, load_condition_adapter
from app.patches.controlnet import ControlNetPatch, LoadedControlNet, load_controlnet
from app.registry import Link, NodeResult, node
from app.types import CONTROL, IMAGE, MODEL, VAE, Spec


def _control_choices() -> list[str]:
    bundled = sorted(p.parent.relative_to(paths.BUNDLED_MODELS).as_posix()
                     for p in paths.BUNDLED_MODELS.glob("*control*/config.json"))
    bundled += sorted(p.relative_to(paths.BUNDLED_MODELS).as_posix()
                      for p in paths.BUNDLED_MODELS.glob("*control*/*.safetensors")
                      if not (p.parent / "config.json").is_file())
    return paths.list_files("controlnets") + bundled


@node(category="loaders", outputs={"control": CONTROL})
def ControlNetLoader(
    controlnet: Annotated[str, Spec(file="controlnets", choices=_control_choices,
                                    tooltip="A diffusers ControlNet folder (SD3, Flux incl. union/XLabs, Sana) or a "
                                            "condition-token adapter .safetensors (EasyControl/OminiControl style).")],
    dtype: Annotated[str, Spec(choices=["auto", "fp32", "bf16", "fp16"])] = "auto",
    device: Annotated[str, Spec(choices=["auto", "cpu", "cuda"])] = "auto",
) -> object:
    """Load a ControlNet or a condition-token control adapter (use it with ApplyControlNet)."""
    dev = resolve_device(device, current().device if device == "auto" else None)
    dt = resolve_dtype(dtype, dev)
    path = Path(controlnet)
    if path.is_file():
        return load_condition_adapter(path, dt, dev)
    return load_controlnet(path, dt, dev)


@node(category="conditioning", outputs={"model": MODEL})
def ApplyControlNet(
    model: MODEL,
    control: CONTROL,
    image: Link(IMAGE, "The control image (e.g. an outline, edge or depth map), resized to the latent size."),
    vae: Link(VAE, "Encodes the control image (not needed by XLabs Flux ControlNets).", optional=True) = None,
    strength: Annotated[float, Spec(min=-10.0, max=10.0, step=0.05, tooltip="Residual / attention strength.")] = 1.0,
    start: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Fraction of the steps before the control starts.")] = 0.0,
    end: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Fraction of the steps after which it stops.")] = 1.0,
    mode: Annotated[int, Spec(min=-1, max=63, tooltip="Union ControlNets: the control mode (-1: not a union model).")] = -1,
) -> NodeResult:
    """Steer a model with a control image. Chain several for several controls at once, each with
    its own strength and step window; they compose with LoRAs."""
    if start > end:
        raise ValueError(f"start ({start}) is after end ({end})")
    if isinstance(control, LoadedControlNet):
        control.check_model(model.family)
        patch = ControlNetPatch(control, image, vae, strength, start, end, mode)
    elif isinstance(control, ConditionAdapter):
        control.check_model(model)
        patch = ConditionTokenPatch(control, image, vae, strength, start, end)
    else:
        raise ValueError(f"not a control model: {type(control).__name__}")
    return NodeResult((model.with_patch(patch),), {"text": [patch.key]})
