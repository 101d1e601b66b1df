"""ControlNet-style injectors: a CONTROL (a diffusers ControlNet, or a condition-token adapter)
applied to a MODEL with a control image. The result is a MODEL view; the control acts only
while a sampler runs (app/models/patches/controlnet.py, app/models/patches/condition_tokens.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch

from app.core import paths
from app.core import vocabulary as vocab
from app.core.context import current
from app.models.handles import resolve_device, resolve_dtype
from app.models.patches.condition_tokens import ConditionAdapter, ConditionTokenPatch, load_condition_adapter
from app.models.patches.controlnet import ControlNetPatch, LoadedControlNet, load_controlnet
from app.core.registry import Link, NodeResult, node
from app.core.types import CONTROL, IMAGE, MODEL, VAE, Spec


def _control_choices() -> list[str]:
    bundled = sorted(p.parent.relative_to(paths.BUNDLED_MODELS).as_posix()
                     for p in paths.BUNDLED_MODELS.glob("*control*/config.json"))
    bundled += sorted(p.relative_to(paths.BUNDLED_MODELS).as_posix()  # condition-token adapters (single files)
                      for p in paths.BUNDLED_MODELS.glob("*control*/**/*.safetensors")
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
    strength: vocab.weight("Residual / attention strength.") = 1.0,
    start: vocab.fraction("Fraction of the steps before the control starts.") = 0.0,
    end: vocab.fraction("Fraction of the steps after which it stops.") = 1.0,
    mode: Annotated[int, Spec(min=-1, max=63, tooltip="Union ControlNets: the control mode (-1: not a union model).")] = -1,
) -> NodeResult:
    """Steer a model with a control image. Chain several for several controls at once, each with
    its own strength and step window; they compose with LoRAs."""
    if start > end:
        raise ValueError(f"start ({start}) is after end ({end})")
    pixel_input = isinstance(control, LoadedControlNet) and getattr(control.controlnet, "input_hint_block", None) is not None
    if vae is None and not pixel_input:
        raise ValueError("this control encodes its image with the VAE: connect the 'vae' input")
    if isinstance(control, LoadedControlNet):
        control.check_model(model.family)
        patch = ControlNetPatch(control, image, vae, strength, start, end, mode)
    elif isinstance(control, ConditionAdapter):
        control.check_model(model)
        patch = ConditionTokenPatch(control, image, vae, strength, start, end)
    else:
        raise ValueError(f"not a control model: {type(control).__name__}")
    return NodeResult((model.with_patch(patch),), {"text": [patch.key]})


def outline_map(image: torch.Tensor, threshold: float = 0.1, width: int = 2) -> torch.Tensor:
    """White-on-black outlines of the colour regions of an IMAGE (B, H, W, C) in [0, 1]: a pixel is
    on the outline when it differs from a 4-neighbour by more than ``threshold`` (max over
    channels); both pixels of such a pair are marked, so the line is 2 px wide and centred on the
    boundary (the shapes world's outline maps). ``width`` > 2 grows it symmetrically."""
    x = image.float()
    if x.dim() == 3:
        x = x[None]
    dy = (x[:, 1:] - x[:, :-1]).abs().amax(-1) > threshold
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().amax(-1) > threshold
    edge = torch.zeros(x.shape[:3], dtype=torch.bool)
    edge[:, 1:] |= dy
    edge[:, :-1] |= dy
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    grow = max(0, (width - 2 + 1) // 2)
    if grow:
        edge = torch.nn.functional.max_pool2d(edge[:, None].float(), 2 * grow + 1, 1, grow)[:, 0] > 0
    return edge.float()[..., None].expand(*edge.shape, 3).contiguous()


@node(category="conditioning", outputs={"image": IMAGE})
def OutlineMap(
    image: IMAGE,
    threshold: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Colour difference that counts as an edge.")] = 0.1,
    width: Annotated[int, Spec(min=2, max=16, tooltip="Line width in pixels.")] = 2,
) -> torch.Tensor:
    """Control preprocessor: the outlines of an image's colour regions, white on black (what the
    shapes-dit outline control expects; also a simple edge map for other ControlNets)."""
    return outline_map(image, threshold, width)
