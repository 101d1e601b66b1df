"""ControlNet residuals as a model patch (diffusers SD3 / Flux (incl. union, XLabs) / Sana ControlNets).

A :class:`ControlNetPatch` runs its ControlNet inside ``wrap`` on the same native inputs as the
transformer call and adds the residuals it returns to the call's kwargs:
``block_controlnet_hidden_states`` (SD3, shapes-dit), ``controlnet_block_samples`` /
``controlnet_single_block_samples`` (Flux), ``controlnet_block_samples`` (Sana). This is exactly
what the diffusers ControlNet pipelines do per step, including how the control image is encoded
(VAE posterior mean here instead of a sample: deterministic), the InstantX conventions
(``force_zeros_for_pooled_projection``: zero pooled text, no VAE shift) and the step window
(a ControlNet is active at step i of N when start <= i/N and (i+1)/N <= end). Several patches
stack: residual lists are summed (expanded to one entry per transformer block when their
lengths differ). Nothing is installed on the shared transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from app.models import families
from app.models.handles import ModelCall, ModelPatch, Resident, SamplingRun

CONTROLNET_CLASSES = {"SD3ControlNetModel": "sd3", "FluxControlNetModel": "flux", "SanaControlNetModel": "sana"}


@dataclass(eq=False)
class LoadedControlNet(Resident):
    """The CONTROL value for a diffusers ControlNet: the module and which family it serves."""

    controlnet: torch.nn.Module
    kind: str  # "sd3" | "flux" | "sana"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    source: str = ""

    def _modules(self) -> list[torch.nn.Module]:
        return [self.controlnet]

    def check_model(self, family: str) -> None:
        cls = type(self.controlnet).__name__
        if families.get(family).controlnet_class != cls:
            served = [f.name for f in families.FAMILIES.values() if f.controlnet_class == cls]
            raise ValueError(f"{self.source}: a {self.kind} ControlNet cannot control a {family} model "
                             f"(it serves {', '.join(served)})")


def step_active(run: SamplingRun, start: float, end: float) -> bool:
    """diffusers' controlnet_keep rule for step ``run.step`` of ``run.total_steps``."""
    n = run.total_steps
    if n <= 0 or (start <= 0.0 and end >= 1.0):
        return True
    i = run.step
    return not (i / n < start or (i + 1) / n > end)


def repeat_to(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat an image/condition batch to a call's batch (CFG calls stack [uncond; cond])."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"control image batch {x.shape[0]} does not divide the model batch {batch}; "
                         "use one control image or one per latent")
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    return x.repeat(batch // x.shape[0], *([1] * (x.dim() - 1)))


def image_to_pixels(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> (B, 3, height, width) in [-1, 1], resized if needed."""
    x = image.float()
    if x.dim() == 3:
        x = x[None]
    x = x[..., :3] if x.shape[-1] >= 3 else x[..., :1].expand(*x.shape[:-1], 3)
    x = x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x * 2 - 1


def encode_image(vae: Any, image: torch.Tensor, latent_hw: tuple[int, int], shift: bool = True) -> torch.Tensor:
    """Normalised VAE latents of a control image at a latent size (posterior mean)."""
    if vae is None:
        raise ValueError("this ControlNet takes VAE latents of the control image: connect the VAE input")
    f = vae.factor
    pixels = image_to_pixels(image, latent_hw[0] * f, latent_hw[1] * f)
    latents = vae.encode((pixels.permute(0, 2, 3, 1) + 1) / 2)
    if not shift:  # InstantX SD3 ControlNets: latent * scale, no shift
        latents = latents + vae.shift_factor * vae.scaling_factor
    return latents


def _expand(residuals: list | tuple, blocks: int, rule: str) -> list:
    """A residual list as one entry per transformer block, by the transformer's own indexing."""
    n = len(residuals)
    if rule == "sd3":
        interval = blocks / n
        return [residuals[int(i / interval)] for i in range(blocks)]
    if rule == "flux_repeat":
        return [residuals[i % n] for i in range(blocks)]
    interval = int(math.ceil(blocks / n))
    return [residuals[i // interval] for i in range(blocks)]


def _add(existing: list | None, new: list, blocks: int, rule: str) -> list:
    if existing is None:
        return list(new)
    if len(existing) != len(new):
        existing, new = _expand(existing, blocks, rule), _expand(new, blocks, rule)
    return [a + b for a, b in zip(existing, new, strict=True)]


class ControlNetPatch(ModelPatch):
    """Add a diffusers ControlNet's residuals to every transformer call inside a step window."""

    def __init__(self, control: LoadedControlNet, image: torch.Tensor, vae: Any = None, strength: float = 1.0,
                 start: float = 0.0, end: float = 1.0, mode: int = -1):
        self.control = control
        self.image = image
        self.vae = vae
        self.strength = float(strength)
        self.start, self.end = float(start), float(end)
        self.mode = int(mode)
        name = control.source.rstrip("/").rsplit("/", 1)[-1] or "controlnet"
        mode_text = f", mode {mode}" if mode >= 0 else ""
        self.key = f"controlnet({name}, {self.strength:g}, {self.start:g}-{self.end:g}{mode_text})"

    def begin_run(self, run: SamplingRun) -> Any:
        self.control.ensure_device()
        return {"cond": {}}

    def _cond(self, state: dict, call: ModelCall) -> torch.Tensor:
        """The encoded control image for this call's latent size (cached for the run)."""
        h, w = call.latents.shape[-2:]
        cn = self.control.controlnet
        key = (h, w)
        if key not in state["cond"]:
            kind = self.control.kind
            if kind == "flux" and getattr(cn, "input_hint_block", None) is not None:
                f = 8 if self.vae is None else self.vae.factor
                cond = image_to_pixels(self.image, h * f, w * f)  # XLabs: pixels, the hint block encodes them
            elif kind == "sd3":
                cond = encode_image(self.vae, self.image, (h, w),
                                    shift=not cn.config.get("force_zeros_for_pooled_projection", False))
            else:
                cond = encode_image(self.vae, self.image, (h, w))
                if kind == "flux":
                    b, c = cond.shape[:2]
                    cond = cond.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
            state["cond"][key] = cond.to(self.control.device, self.control.dtype)
        return state["cond"][key]

    def wrap(self, state: Any, call: ModelCall, forward) -> torch.Tensor:
        if self.strength == 0.0 or not step_active(call.run, self.start, self.end):
            return forward(call)
        kw = call.kwargs
        batch = kw["hidden_states"].shape[0]
        cond = repeat_to(self._cond(state, call), batch)
        cn = self.control.controlnet
        dt = self.control.dtype
        out_dtype = kw["hidden_states"].dtype
        blocks = len(call.run.transformer.transformer_blocks)

        def cast(t):
            return None if t is None else t.to(self.control.device, dt) if t.is_floating_point() else t.to(self.control.device)

        kind = self.control.kind
        if kind == "sd3":
            pooled = kw.get("pooled_projections")
            if cn.config.get("force_zeros_for_pooled_projection", False) and pooled is not None:
                pooled = torch.zeros_like(pooled)
            text = kw["encoder_hidden_states"] if cn.config.get("joint_attention_dim") is not None else None
            residuals = cn(hidden_states=cast(kw["hidden_states"]), timestep=cast(kw["timestep"]),
                           encoder_hidden_states=cast(text), pooled_projections=cast(pooled), controlnet_cond=cond,
                           conditioning_scale=self.strength, return_dict=False)[0]
            residuals = [r.to(out_dtype) for r in residuals]
            kw["block_controlnet_hidden_states"] = _add(kw.get("block_controlnet_hidden_states"), residuals, blocks, "sd3")
        elif kind == "flux":
            guidance = kw.get("guidance")
            if cn.config.get("guidance_embeds", False) and guidance is None:
                value = (call.cond.extras or {}).get("guidance", 3.5) if getattr(call.cond, "extras", None) else 3.5
                guidance = torch.full((batch,), float(value), device=self.control.device, dtype=torch.float32)
            elif not cn.config.get("guidance_embeds", False):
                guidance = None
            mode = None
            if self.mode >= 0:
                mode = torch.full((batch, 1), self.mode, dtype=torch.long, device=self.control.device)
            elif cn.union:
                raise ValueError(f"{self.control.source}: a union ControlNet needs a mode (0..{cn.config.num_mode - 1})")
            double, single = cn(hidden_states=cast(kw["hidden_states"]), controlnet_cond=cond, controlnet_mode=mode,
                                conditioning_scale=self.strength, timestep=cast(kw["timestep"]), guidance=guidance,
                                pooled_projections=cast(kw.get("pooled_projections")),
                                encoder_hidden_states=cast(kw["encoder_hidden_states"]), txt_ids=kw["txt_ids"],
                                img_ids=kw["img_ids"], return_dict=False)
            repeat = getattr(cn, "input_hint_block", None) is not None
            rule = "flux_repeat" if repeat else "flux"
            if double is not None:
                double = [r.to(out_dtype) for r in double]
                if kw.get("controlnet_block_samples") is not None and kw.get("controlnet_blocks_repeat") != repeat:
                    kw["controlnet_block_samples"] = _expand(kw["controlnet_block_samples"], blocks,
                                                             "flux_repeat" if kw.get("controlnet_blocks_repeat") else "flux")
                    double = _expand(double, blocks, rule)
                    repeat = False
                kw["controlnet_block_samples"] = _add(kw.get("controlnet_block_samples"), double, blocks, rule)
                kw["controlnet_blocks_repeat"] = repeat
            if single is not None:
                single = [r.to(out_dtype) for r in single]
                n_single = len(call.run.transformer.single_transformer_blocks)
                kw["controlnet_single_block_samples"] = _add(kw.get("controlnet_single_block_samples"), single,
                                                             n_single, "flux")
        elif kind == "sana":
            residuals = cn(cast(kw["hidden_states"]), encoder_hidden_states=cast(kw["encoder_hidden_states"]),
                           encoder_attention_mask=kw.get("encoder_attention_mask"), timestep=cast(kw["timestep"]),
                           controlnet_cond=cond, conditioning_scale=self.strength, return_dict=False)[0]
            residuals = [r.to(out_dtype) for r in residuals]
            existing = kw.get("controlnet_block_samples")
            if existing is not None and len(existing) != len(residuals):
                raise ValueError("Sana ControlNets with different depths cannot be stacked")
            kw["controlnet_block_samples"] = tuple(_add(existing and list(existing), residuals, blocks, "sana"))
        return forward(call)


def load_controlnet(folder, dtype: torch.dtype, device: torch.device) -> LoadedControlNet:
    """A diffusers ControlNet folder (config.json + safetensors)."""
    import json
    from pathlib import Path

    import diffusers

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: not a diffusers ControlNet folder (no config.json)")
    class_name = json.loads(config_path.read_text()).get("_class_name", "")
    if class_name not in CONTROLNET_CLASSES:
        raise ValueError(f"{folder}: {class_name!r} is not a supported ControlNet "
                         f"(supported: {', '.join(CONTROLNET_CLASSES)})")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no .safetensors weights (pickled .bin files are refused)")
    cls = getattr(diffusers, class_name)
    try:
        model = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise ValueError(f"{folder}: could not load {class_name}: {type(exc).__name__}: {exc}") from None
    return LoadedControlNet(model.to(device).eval(), CONTROLNET_CLASSES[class_name], device, dtype, str(folder))
