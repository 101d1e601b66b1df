"""Samplers: ``(x, sigmas, denoise_fn, callback, noise=None) -> x`` in the flow convention.

``denoise_fn(x, s, step)`` returns a :class:`Denoised` pair; ``callback(step, x, denoised)``
reports progress; ``noise(step)`` draws fresh seeded noise (only stochastic samplers use it).
Every sampler is registered here once with :func:`register`: the nodes' choices, the loop and
the editing code all read :data:`SAMPLERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from app.models.sampling.guidance import Denoised

DenoiseFn = Callable[[torch.Tensor, float, int], Denoised]
NoiseFn = Callable[[int], torch.Tensor]

SAMPLERS: dict[str, Callable] = {}
# variants taken instead for eps (VP) models where the velocity form is stiff (inversion/editing)
EPS_VARIANTS: dict[str, Callable] = {}


def register(name: str, *, eps_variant_of: str | None = None) -> Callable[[Callable], Callable]:
    """Register a sampler under ``name`` (or as the eps-model variant of sampler ``eps_variant_of``)."""
    def add(fn: Callable) -> Callable:
        if eps_variant_of:
            EPS_VARIANTS[eps_variant_of] = fn
        else:
            SAMPLERS[name] = fn
        return fn

    return add


def get_sampler(name: str, eps_model: bool = False) -> Callable:
    """The sampler ``name`` (its eps variant for eps models when one exists)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return EPS_VARIANTS.get(name, SAMPLERS[name]) if eps_model else SAMPLERS[name]


@register("euler")
def sample_euler(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable,
                 noise: NoiseFn | None = None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        s_next = float(sigmas[i + 1])
        d = fn(x, float(sigmas[i]), i)
        x = (1 - s_next) * d.x0 + s_next * d.noise
        callback(i, x, d)
    return x


@register("heun")
def sample_heun(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable,
                noise: NoiseFn | None = None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = fn(x, s, i)
        dt = s_next - s
        x_euler = x + dt * d.velocity
        if s_next == 0:
            x = x_euler
        else:
            d2 = fn(x_euler, s_next, i)
            x = x + dt * 0.5 * (d.velocity + d2.velocity)
        callback(i, x, d)
    return x


@register("rf_solver")
def sample_rf_solver(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable,
                     noise: NoiseFn | None = None) -> torch.Tensor:
    """RF-Solver (2nd order, 2 evaluations): x += Δ v + ½ Δ² v', v' from a half step."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = s_next - s
        d = fn(x, s, i)
        v1 = d.velocity
        x_mid = x + 0.5 * dt * v1
        v_mid = fn(x_mid, s + 0.5 * dt, i).velocity
        dv = (v_mid - v1) / (0.5 * dt)
        x = x + dt * v1 + 0.5 * dt * dt * dv
        callback(i, x, d)
    return x


@register("dpmpp_2m")
def sample_dpmpp_2m(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable,
                    noise: NoiseFn | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) in flow form: alpha = 1 - s, sigma = s, lambda = log(alpha/sigma);
    first order on the first and last steps (the last step returns the denoised estimate)."""
    old_x0, old_h = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = fn(x, s, i)
        if s_next == 0:
            x = d.x0
        else:
            lam = math.log((1 - s) / s) if s < 1 else -math.inf
            lam_next = math.log((1 - s_next) / s_next)
            h = lam_next - lam
            x0 = d.x0
            if old_x0 is not None and math.isfinite(h) and old_h:
                r = old_h / h
                x0 = (1 + 1 / (2 * r)) * d.x0 - (1 / (2 * r)) * old_x0
            factor = -math.expm1(-h) if math.isfinite(h) else 1.0
            x = (s_next / s) * x + (1 - s_next) * factor * x0
            old_h = h if math.isfinite(h) else None
        old_x0 = d.x0
        callback(i, x, d)
    return x


@register("lcm")
def sample_lcm(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable,
               noise: NoiseFn | None = None) -> torch.Tensor:
    """Consistency multistep (LCM, Luo et al. 2023; also sCM/TrigFlow as Sana-Sprint samples):
    jump to the denoised estimate, then re-noise it to the next sigma with fresh noise,
    x' = (1 - s') x0 + s' ε. In flow coordinates ``LCMScheduler``'s and ``SCMScheduler``'s steps
    are both this (their boundary-condition blend c_skip is < 1e-7 at the timesteps used)."""
    for i in range(len(sigmas) - 1):
        s_next = float(sigmas[i + 1])
        d = fn(x, float(sigmas[i]), i)
        if s_next > 0:
            if noise is None:
                raise ValueError("the lcm sampler needs seeded step noise (run it through sample/integrate)")
            x = (1 - s_next) * d.x0 + s_next * noise(i)
        else:
            x = d.x0
        callback(i, x, d)
    return x


@register("rf_solver_eps", eps_variant_of="rf_solver")
def sample_rf_solver_eps(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable,
                         noise: NoiseFn | None = None) -> torch.Tensor:
    """RF-Solver for eps (VP) models such as PixArt, taken in the coordinates where their ODE is
    dx̄/dσ = ε (x̄ = x/(1 - s), σ = s/(1 - s)): there Euler is DDIM, and RF-Solver's step
    x̄ += Δ ε + ½ Δ² ε' with ε' from a half step is the midpoint rule. In the velocity form
    the derivative of v = (ε - x)/(1 - s) is stiff near the model's top sigma."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        ve, ve_next = s / (1 - s), s_next / (1 - s_next)
        d = fn(x, s, i)
        x_bar = x / (1 - s)
        delta = ve_next - ve
        ve_mid = ve + 0.5 * delta
        s_mid = ve_mid / (1 + ve_mid)
        d_mid = fn((x_bar + 0.5 * delta * d.noise) * (1 - s_mid), s_mid, i)
        x = (x_bar + delta * d_mid.noise) * (1 - s_next)
        callback(i, x, d)
    return x
