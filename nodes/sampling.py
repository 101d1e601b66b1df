"""Sampling nodes: Sampler, Scheduler (SIGMAS), SamplerCustom, SplitSigmas, ModelSamplingDefaults,
and the CFG adjustments a MODEL can carry (CFGNorm, FreSca).

Thin declarations over the sampling library (app/models/sampling): schedules, guidance,
the sampler registry and the loop live there.
"""

from __future__ import annotations

from typing import Annotated

import torch

from app.core import paths
from app.core import vocabulary as vocab
from app.core.registry import Link, node
from app.core.types import CONDITIONING, FLOAT, INT, LATENT, MODEL, SIGMAS, STRING, Spec
from app.core.workflow import Connection, Workflow
from app.models.families.variants import guidance_warning
from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.sampling import compute_sigmas, sample, sampling_defaults
from app.models.sampling import guidance as cfg_patches
from app.models.sampling.defaults import checkpoint_variant


def distilled_cfg_check(node_id: str, workflow: Workflow) -> list[tuple[str, str | None]]:
    """Validation warning: real CFG (cfg > 1 with a negative) on a guidance-distilled checkpoint
    (Flux-schnell/dev, SD3.5-turbo, Sana-Sprint, shapes-dit-turbo ...), read from the configs
    of the checkpoint folder the MODEL comes from (through LoRA, compile, ... nodes)."""
    inputs = workflow.nodes[node_id].inputs
    cfg = inputs.get("cfg", 4.0)
    if not isinstance(inputs.get("negative"), Connection) or not isinstance(cfg, (int, float)) or cfg <= 1.0:
        return []
    link, seen = inputs.get("model"), set()
    while isinstance(link, Connection) and link.node not in seen and link.node in workflow.nodes:
        seen.add(link.node)
        source = workflow.nodes[link.node].inputs
        if isinstance(source.get("checkpoint"), str):
            try:
                folder = paths.resolve("checkpoints", source["checkpoint"])
            except paths.PathRefused:
                return []  # the loader's own input reports it
            message = guidance_warning(checkpoint_variant(folder), float(cfg), True)
            return [(message, "cfg")] if message else []
        link = source.get("model")
    return []


@node(category="sampling", outputs={"latent": LATENT}, check=distilled_cfg_check)
def Sampler(
    model: MODEL,
    positive: CONDITIONING,
    latent: LATENT,
    negative: Link(CONDITIONING, "Unconditional/negative prompt; leave empty for none (cfg is then ignored).", optional=True) = None,
    seed: vocab.SEED = 0,
    steps: vocab.STEPS = 28,
    cfg: vocab.CFG = 4.0,
    sampler: vocab.SAMPLER = "euler",
    scheduler: vocab.SCHEDULER = "auto",
    shift: vocab.SHIFT = 0.0,
    guidance: vocab.GUIDANCE_METHOD = "cfg",
    denoise: vocab.DENOISE = 1.0,
) -> Latent:
    """Denoise a latent with a flow-matching ODE sampler and classifier-free guidance."""
    if denoise <= 0:
        return latent
    dims = tuple(latent.samples.shape[2:])  # (h, w), or (frames, h, w) for videos
    sigmas = compute_sigmas(model, scheduler, steps, shift, dims, denoise)
    return sample(model, latent, positive, negative, sigmas, seed, cfg, guidance, sampler)


@node(category="sampling", outputs={"sigmas": SIGMAS})
def Scheduler(
    model: MODEL,
    steps: vocab.STEPS = 28,
    scheduler: vocab.SCHEDULER = "auto",
    shift: vocab.SHIFT = 0.0,
    denoise: vocab.DENOISE = 1.0,
    width: vocab.size("Image width (dynamic shift only).") = 1024,
    height: vocab.size("Image height (dynamic shift only).") = 1024,
) -> torch.Tensor:
    """The noise levels (flow sigmas) a sampler will step through."""
    factor = model.info.vae_factor
    return compute_sigmas(model, scheduler, steps, shift, (height // factor, width // factor), denoise)


@node(category="sampling", outputs={"latent": LATENT}, check=distilled_cfg_check)
def SamplerCustom(
    model: MODEL,
    positive: CONDITIONING,
    latent: LATENT,
    sigmas: SIGMAS,
    negative: Link(CONDITIONING, optional=True) = None,
    seed: vocab.SEED = 0,
    cfg: vocab.CFG = 4.0,
    sampler: vocab.SAMPLER = "euler",
    guidance: vocab.GUIDANCE_METHOD = "cfg",
    add_noise: Annotated[bool, Spec(tooltip="Off: the latent is already noised to the first sigma "
                                            "(the second half of a split schedule).")] = True,
) -> Latent:
    """Sample along given SIGMAS (from a Scheduler, or split/edited ones)."""
    return sample(model, latent, positive, negative, sigmas, seed, cfg, guidance, sampler, add_noise=add_noise)


@node(category="sampling", outputs={"high": SIGMAS, "low": SIGMAS})
def SplitSigmas(sigmas: SIGMAS, step: Annotated[int, Spec(min=0, max=1000)] = 0) -> tuple:
    """Split a schedule at ``step`` (both halves share that sigma): for two-stage sampling."""
    return sigmas[: step + 1], sigmas[step:]


@node(category="sampling", outputs={"steps": INT, "cfg": FLOAT, "sampler": STRING, "scheduler": STRING})
def ModelSamplingDefaults(model: MODEL) -> tuple:
    """The settings the model's own pipeline samples with (family, few-step variant such as
    Flux-schnell or PixArt-LCM, manifest): link them to a Sampler's widgets."""
    d = sampling_defaults(model)
    return int(d["steps"]), float(d["cfg"]), str(d["sampler"]), str(d["scheduler"])


@node(category="sampling/guidance", outputs={"model": MODEL})
def CFGNorm(
    model: MODEL,
    strength: Annotated[float, Spec(min=0.0, max=100.0, step=0.01, tooltip="1: the full rescale.")] = 1.0,
    pre_cfg: Annotated[bool, Spec(tooltip="Off: scale the guided result down (never up) to the conditional one's "
                                          "norm. On: rescale the guided velocity to it, up or down.")] = False,
) -> ModelHandle:
    """Keep classifier-free guidance from overshooting: rescale the guided prediction to the norm
    of the conditional one at each position (ComfyUI's CFGNorm; it replaces the family's own
    renormalisation where the family has one, e.g. Qwen-Image)."""
    return model.with_cfg_patch(cfg_patches.CFGNorm(float(strength), bool(pre_cfg)))


@node(category="sampling/guidance", outputs={"model": MODEL})
def FreSca(
    model: MODEL,
    scale_low: Annotated[float, Spec(min=0.0, max=10.0, step=0.01, tooltip="Scale of the low-frequency guidance.")] = 1.0,
    scale_high: Annotated[float, Spec(min=0.0, max=10.0, step=0.01, tooltip="Scale of the high-frequency guidance.")] = 1.25,
    freq_cutoff: Annotated[int, Spec(min=1, max=10000, tooltip="Frequencies from the centre counted as low.")] = 20,
) -> ModelHandle:
    """Scale the guidance (conditional minus unconditional) per frequency band before CFG
    combines: more high-frequency detail (FreSca, ComfyUI's node of that name)."""
    return model.with_cfg_patch(cfg_patches.FreSca(float(scale_low), float(scale_high), int(freq_cutoff)))
