"""The sampling loop: one guided ODE integration shared by the Sampler nodes and the editing code.

Everything works in the engine's flow convention: x_s = (1 - s) x0 + s noise, the model
returns v = noise - x0 (``ModelHandle.predict``), and a schedule is a decreasing tensor of
flow sigmas ending at 0 (increasing from 0 for inversion).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from app.core.context import current
from app.models.handles import ModelHandle
from app.models.latents import Latent
from app.models.sampling.defaults import sampling_defaults, warn_guidance
from app.models.sampling.guidance import GUIDANCE, Denoised, GuidanceState, guide, renorm_of, velocity_pair
from app.models.sampling.noise import NoiseStream
from app.models.sampling.previews import Previewer
from app.models.sampling.samplers import get_sampler


def latent_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A LATENT noise mask (H, W), (B, H, W) or (B, 1, H, W) -> (B, 1, h, w) at ``like``'s size."""
    m = mask.float()
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    if m.shape[-2:] != like.shape[-2:]:
        m = torch.nn.functional.interpolate(m, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return m.to(like.device).expand(like.shape[0], 1, *like.shape[-2:]) if m.shape[0] in (1, like.shape[0]) else m


def check_inputs(model: ModelHandle, latent: Latent, positive: Any, negative: Any | None) -> None:
    """Clear errors for wiring mistakes that would otherwise fail deep inside the transformer."""
    channels = latent.samples.shape[1]
    if channels != model.latent_channels:
        raise ValueError(f"the latent has {channels} channels but the {model.family} model expects "
                         f"{model.latent_channels}: make the latent with EmptyLatent/VAEEncode of the same family")
    for name, cond in (("positive", positive), ("negative", negative)):
        family = getattr(cond, "family", "") if cond is not None else ""
        if family not in ("", model.family):  # unset, or encoded for this model's family
            raise ValueError(f"the {name} conditioning was encoded for {family} but the model is {model.family}: "
                             "encode with the text encoder(s) of this model's family")


def check_guidance(guidance: str) -> None:
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r}; expected one of {', '.join(GUIDANCE)}")


@torch.no_grad()
def integrate(
    model: ModelHandle,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    positive: Any,
    negative: Any | None = None,
    cfg: float = 1.0,
    *,
    guidance: str = "cfg",
    solver: str = "euler",
    eps_variant: bool = False,
    controller: Callable[[torch.Tensor, float, torch.Tensor, int], torch.Tensor] | None = None,
    value_interval: Callable[[int], int | None] | None = None,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    noise: Callable[[int], torch.Tensor] | None = None,
    progress: Callable | None = None,
    seed: int | None = None,
    guidance_options: dict | None = None,
    preview: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Integrate the guided flow ODE along ``sigmas`` (decreasing: sampling; increasing: inversion).

    ``solver`` names a registered sampler (``eps_variant``: its eps-model variant for eps models);
    ``controller(x, s, v, step)`` may replace the guided velocity (RF-Inversion);
    ``value_interval(step)`` names the interval whose attention values are recorded/injected
    (RF-Edit; None: none); ``after_step(step, x)`` may change x after each step (mask blending);
    ``noise(step)`` gives stochastic samplers fresh noise. Returns the final x (float32 on the
    model's device) and the run's extras.
    """
    step_fn = get_sampler(solver, eps_variant and model.info.discrete_time)
    check_guidance(guidance)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    steps = len(sigmas) - 1
    device = model.device
    x = x.to(device, torch.float32)
    use_uncond = negative is not None and not (guidance == "cfg" and cfg == 1.0)
    state, options, renorm = GuidanceState(), dict(guidance_options or {}), renorm_of(model)
    progress = progress or current().progress
    previews = Previewer(model, preview)
    with model.sampling_run(sigmas, seed=seed) as run:
        evaluations: dict[int, int] = {}

        def denoise_fn(x_t: torch.Tensor, s: float, i: int) -> Denoised:
            run.step = i
            order = evaluations[i] = evaluations.get(i, 0) + 1
            interval = value_interval(i) if value_interval is not None else None
            run.extras["value_key"] = None if interval is None else (interval, order - 1)
            s_t = torch.full((x_t.shape[0],) + (1,) * (x_t.dim() - 1), s, device=device)  # images and videos
            if use_uncond:
                v_u, v_c = model.predict_many(x_t, s, [negative, positive])
            else:
                v_c, v_u = model.predict(x_t, s, positive), None
            d = guide(guidance, x_t, s_t, v_c, v_u, cfg, i, state, options, renorm)
            if controller is not None:
                d = velocity_pair(x_t, s_t, controller(x_t, s, d.velocity, i))
            # The family's constraint again, on the guided velocity: each branch held it (a given first
            # frame), but CFG-Zero*'s scaled and zeroed velocities and APG's projections do not keep it.
            v = d.velocity
            held = model.info.constrain_velocity(v, x_t, s_t, positive)
            return d if held is v else velocity_pair(x_t, s_t, held)

        def callback(i: int, x_t: torch.Tensor, d: Denoised) -> None:
            progress(i + 1, steps, previews(i + 1, steps, d.x0))

        if after_step is None:
            x = step_fn(x, sigmas, denoise_fn, callback, noise=noise)
        else:  # one step at a time, so after_step sees every step
            for i in range(steps):
                x = step_fn(x, sigmas[i:i + 2], lambda xt, s, _j, i=i: denoise_fn(xt, s, i),
                            lambda _j, xt, d, i=i: callback(i, xt, d),
                            noise=None if noise is None else (lambda _j, i=i: noise(i)))
                x = after_step(i, x)
        run.extras.pop("value_key", None)
        extras = dict(run.extras)
    return x, extras


def starting_point(model: ModelHandle, x0: torch.Tensor, noise: torch.Tensor, s0: float) -> torch.Tensor:
    """x at the first sigma, as the pipelines make it: at the model's top sigma (full denoise) the
    noise is scaled by sqrt(s0^2 + (1-s0)^2) (exactly ``noise`` for flow models), else by s0."""
    full = s0 >= model.sigma_max - 1e-4
    scale = math.sqrt(s0 * s0 + (1 - s0) ** 2) if full else s0
    return (1 - s0) * x0 + scale * noise


@torch.no_grad()
def sample(
    model: ModelHandle,
    latent: Latent,
    positive: Any,
    negative: Any | None,
    sigmas: torch.Tensor,
    seed: int,
    cfg: float,
    guidance: str = "cfg",
    sampler_name: str = "euler",
    denoise: float = 1.0,
    progress: Callable[[int, int, Any], None] | None = None,
    *,
    noise: torch.Tensor | None = None,
    guidance_options: dict | None = None,
    preview: bool = True,
    add_noise: bool = True,
) -> Latent:
    """Denoise ``latent`` along ``sigmas`` (flow sigmas, decreasing to 0) and return a LATENT.

    The start is :func:`starting_point`. ``denoise`` < 1 keeps only the last fraction of
    ``sigmas``. A ``noise_mask`` in the latent (1 = regenerate) keeps the rest of the input.
    ``progress(step, total, preview)`` is called after each step (defaults to the run context).
    ``add_noise=False`` takes the latent as already noised to ``sigmas[0]`` (second stage of a
    split schedule).
    """
    if sampler_name in ("auto", "", None):
        sampler_name = sampling_defaults(model)["sampler"]
    get_sampler(sampler_name)
    check_guidance(guidance)
    check_inputs(model, latent, positive, negative)
    warn_guidance(model, cfg, negative is not None)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    if denoise < 1.0:
        keep = max(1, round((len(sigmas) - 1) * denoise))
        sigmas = sigmas[-(keep + 1):]
    device = model.device
    x0_in = latent.samples.float()
    stream = NoiseStream(tuple(x0_in.shape), seed, latent.batch_index)
    if noise is None:
        noise = stream(0)
    noise = noise.to(device, torch.float32)
    x0_in = x0_in.to(device)
    x = starting_point(model, x0_in, noise, float(sigmas[0])) if add_noise else x0_in.clone()
    after_step = None
    if latent.noise_mask is not None:
        mask = latent_mask(latent.noise_mask, x)

        def after_step(i: int, x_t: torch.Tensor) -> torch.Tensor:
            # inpainting: put back the input, re-noised to the next sigma, outside the mask
            s_next = float(sigmas[i + 1])
            return mask * x_t + (1 - mask) * ((1 - s_next) * x0_in + s_next * noise)

    x, _ = integrate(model, x, sigmas, positive, negative, cfg, guidance=guidance, solver=sampler_name,
                     after_step=after_step, noise=lambda i: stream(i + 1).to(device),
                     progress=progress, seed=seed, guidance_options=guidance_options, preview=preview)
    return Latent(x.float().cpu(), latent.noise_mask, latent.batch_index)
