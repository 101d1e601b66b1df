"""Editing nodes: img2img and inpainting, flow-ODE inversion (RF-Edit, RF-Inversion), FlowEdit.

Thin declarations over app/models/editing.py (the loops and the INVERSION value) and the
sampling library (app/models/sampling).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from app.core import vocabulary as vocab
from app.core.registry import Link, node
from app.core.types import CONDITIONING, IMAGE, LATENT, MASK, MODEL, Spec
from app.models.editing import SOLVERS, blend_mask, edit_from_inversion, flow_edit, invert
from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.masks import as_mask, blur, grow
from app.models.sampling import compute_sigmas, sample

INVERSION = "INVERSION"  # socket type: an app.models.editing.Inversion


def _sigmas(model: ModelHandle, scheduler: str, steps: int, shift: float, latent: torch.Tensor,
            strength: float = 1.0) -> torch.Tensor:
    return compute_sigmas(model, scheduler, steps, shift, tuple(latent.shape[-2:]), strength)


# ---------------------------------------------------------------------------------------------
# nodes


@node(category="edit", outputs={"latent": LATENT})
def ImageToImage(
    model: MODEL,
    positive: CONDITIONING,
    latent: Link(LATENT, "The encoded input image (VAEEncode)."),
    negative: Link(CONDITIONING, "Unconditional/negative prompt; leave empty for none.", optional=True) = None,
    mask: Link(MASK, "Optional: only the masked area (1) changes; the rest keeps the input.", optional=True) = None,
    seed: vocab.SEED = 0,
    steps: vocab.steps("Steps actually run (of a schedule of steps/strength).") = 20,
    cfg: vocab.CFG = 4.0,
    strength: vocab.STRENGTH = 0.6,
    sampler: vocab.SAMPLER = "euler",
    scheduler: vocab.SCHEDULER = "auto",
    shift: vocab.SHIFT = 0.0,
    guidance: vocab.GUIDANCE_METHOD = "cfg",
    mask_grow: vocab.GROW = 0,
    mask_blur: vocab.FEATHER = 0.0,
) -> Latent:
    """Image to image (SDEdit): re-noise the input to ``strength`` and denoise it under the prompt;
    with a mask, only the masked area changes (latent blending at every step). Works for every
    family, PixArt included."""
    if strength <= 0:
        return latent
    if mask is not None:
        m = blend_mask(mask, latent.samples, mask_grow, mask_blur)
        latent = Latent(latent.samples, m[:, 0].cpu(), latent.batch_index)
    sigmas = _sigmas(model, scheduler, steps, shift, latent.samples, strength)
    return sample(model, latent, positive, negative, sigmas, seed, cfg, guidance, sampler)


@node(category="edit", outputs={"latent": LATENT})
def Inpaint(
    model: MODEL,
    positive: CONDITIONING,
    latent: Link(LATENT, "The encoded input image (VAEEncode)."),
    mask: Link(MASK, "1 = regenerate, 0 = keep (any size: it is resized to the latent)."),
    negative: Link(CONDITIONING, "Unconditional/negative prompt; leave empty for none.", optional=True) = None,
    seed: vocab.SEED = 0,
    steps: vocab.STEPS = 28,
    cfg: vocab.CFG = 4.0,
    strength: vocab.fraction("1 = fill the masked area from pure noise.") = 1.0,
    sampler: vocab.SAMPLER = "euler",
    scheduler: vocab.SCHEDULER = "auto",
    shift: vocab.SHIFT = 0.0,
    guidance: vocab.GUIDANCE_METHOD = "cfg",
    mask_grow: vocab.GROW = 0,
    mask_blur: vocab.FEATHER = 0.0,
) -> Latent:
    """Inpainting for any DiT (no inpainting model needed): the masked area is generated under the
    prompt while the rest is put back from the input after every step, so it stays unchanged."""
    return ImageToImage(model, positive, latent, negative, mask, seed, steps, cfg, strength, sampler, scheduler,
                        shift, guidance, mask_grow, mask_blur)


@node(category="edit/inversion", outputs={"latent": LATENT, "inversion": INVERSION})
def InvertLatent(
    model: MODEL,
    positive: Link(CONDITIONING, "The prompt describing the source image (or an empty prompt)."),
    latent: Link(LATENT, "The encoded source image (VAEEncode)."),
    negative: Link(CONDITIONING, "Only used when cfg != 1.", optional=True) = None,
    steps: vocab.STEPS = 28,
    cfg: vocab.cfg("1 = no guidance (the most exact inversion).") = 1.0,
    solver: Annotated[str, Spec(choices=SOLVERS, tooltip="rf_solver: 2nd order (2 evaluations per step), far more exact than Euler.")] = "rf_solver",
    scheduler: vocab.SCHEDULER = "auto",
    shift: vocab.SHIFT = 0.0,
    strength: vocab.fraction("How far to invert: 1 = all the way to noise.", minimum=0.01) = 1.0,
    gamma: Annotated[float, Spec(min=0.0, max=1.0, step=0.05, tooltip="RF-Inversion: pull towards seeded noise (0 = plain inversion; paper: 0.5).")] = 0.0,
    seed: vocab.seed("The noise RF-Inversion steers to (gamma > 0).") = 0,
    store_steps: vocab.steps("RF-Edit: record late-block attention values for the last N steps (= the first N editing steps).", minimum=0) = 0,
    value_blocks: Annotated[int, Spec(min=0, max=256, tooltip="RF-Edit: how many of the last attention blocks to record (0 = the later half).")] = 0,
    guidance: vocab.GUIDANCE_METHOD = "cfg",
) -> tuple:
    """Invert an image: integrate the flow ODE backwards from the image to noise (Euler or
    RF-Solver), optionally with RF-Inversion's controller and RF-Edit's stored attention values.
    Feed the INVERSION to EditFromInversion with the same or a new prompt."""
    sigmas = _sigmas(model, scheduler, steps, shift, latent.samples, strength)
    inversion = invert(model, latent.samples, positive, sigmas, negative, cfg, solver=solver, guidance=guidance,
                       gamma=gamma, seed=seed, store_steps=store_steps, value_blocks=value_blocks,
                       batch_index=latent.batch_index)
    return Latent(inversion.latent, None, latent.batch_index), inversion


@node(category="edit/inversion", outputs={"latent": LATENT})
def EditFromInversion(
    model: MODEL,
    inversion: Link(INVERSION, "From InvertLatent."),
    positive: Link(CONDITIONING, "The target prompt (the source prompt reconstructs the image)."),
    negative: Link(CONDITIONING, "Only used when cfg != 1.", optional=True) = None,
    mask: Link(MASK, "Optional: only the masked area (1) is edited; the rest follows the inversion back to the source.", optional=True) = None,
    cfg: vocab.CFG = 1.0,
    solver: Annotated[str, Spec(choices=["same", *SOLVERS], tooltip="same: the inversion's solver.")] = "same",
    inject_steps: vocab.steps("RF-Edit: use the stored attention values for the first N steps.", minimum=0) = 0,
    eta: Annotated[float, Spec(min=0.0, max=1.0, step=0.05, tooltip="RF-Inversion: pull towards the source image (0 = off; paper: 0.9).")] = 0.0,
    eta_start: vocab.fraction("Fraction of the steps where the pull starts.") = 0.0,
    eta_stop: vocab.fraction("Fraction of the steps where the pull stops.") = 0.25,
    guidance: vocab.GUIDANCE_METHOD = "cfg",
) -> Latent:
    """Sample an inverted image back under a new prompt: RF-Edit (attention-value injection for
    the first steps) and/or RF-Inversion (controlled ODE towards the source)."""
    x = edit_from_inversion(model, inversion, positive, negative, cfg, solver=solver, guidance=guidance,
                            inject_steps=inject_steps, eta=eta, eta_start=eta_start, eta_stop=eta_stop, mask=mask)
    return Latent(x, None, inversion.batch_index)


@node(category="edit", outputs={"latent": LATENT})
def FlowEdit(
    model: MODEL,
    latent: Link(LATENT, "The encoded source image (VAEEncode)."),
    source: Link(CONDITIONING, "Prompt describing the source image."),
    target: Link(CONDITIONING, "Prompt describing the wanted edit."),
    negative: Link(CONDITIONING, "Unconditional/negative prompt (for the cfg scales).", optional=True) = None,
    mask: Link(MASK, "Optional: only the masked area (1) changes.", optional=True) = None,
    seed: vocab.SEED = 0,
    steps: vocab.steps("Steps of the full schedule (FlowEdit paper: SD3 50, Flux 28).") = 28,
    n_max: vocab.steps("Edit over the last n_max steps (more = stronger edits; SD3 33/50, Flux 24/28).") = 20,
    n_min: vocab.steps("Sample the last n_min steps plainly from the target (0 = none).", minimum=0) = 0,
    n_avg: Annotated[int, Spec(min=1, max=64, tooltip="Noise draws averaged per step.")] = 1,
    source_cfg: vocab.CFG = 1.5,
    target_cfg: vocab.CFG = 5.5,
    scheduler: vocab.SCHEDULER = "auto",
    shift: vocab.SHIFT = 0.0,
    guidance: vocab.GUIDANCE_METHOD = "cfg",
) -> Latent:
    """FlowEdit (inversion-free editing): moves the image along the difference of the target and
    source velocity fields; the same prompt for both returns the source unchanged."""
    sigmas = _sigmas(model, scheduler, steps, shift, latent.samples)
    x = flow_edit(model, latent.samples, source, target, sigmas, negative, source_cfg=source_cfg,
                  target_cfg=target_cfg, n_max=n_max, n_min=n_min, n_avg=n_avg, seed=seed, guidance=guidance,
                  mask=mask, batch_index=latent.batch_index)
    return Latent(x, None, latent.batch_index)


@node(category="edit", outputs={"image": IMAGE})
def PasteMasked(
    original: Link(IMAGE, "The image that was edited."),
    edited: Link(IMAGE, "The decoded edit (resized to the original when sizes differ)."),
    mask: Link(MASK, "1 = take the edit, 0 = keep the original."),
    grow_pixels: vocab.grow_pixels("Grow the mask first (covers the decoder's seam).") = 0,
    feather: vocab.feather("Blend width at the mask edge (pixels).") = 0.0,
) -> torch.Tensor:
    """Paste an inpainted/edited image back over the original through the mask, so pixels outside
    it are exactly the original's (the VAE round trip otherwise changes them slightly)."""
    if edited.shape[1:3] != original.shape[1:3]:
        edited = F.interpolate(edited.permute(0, 3, 1, 2), size=original.shape[1:3], mode="bilinear",
                               align_corners=False).permute(0, 2, 3, 1)
    m = as_mask(mask)
    if m.shape[-2:] != original.shape[1:3]:
        m = F.interpolate(m[:, None], size=original.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    m = blur(grow(m, grow_pixels), feather)[..., None]
    return (original * (1 - m) + edited * m).clamp(0, 1)
