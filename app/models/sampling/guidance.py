"""Guidance: turn conditional/unconditional velocities into a denoised pair (x0, noise).

Methods: CFG, CFG++ (Chung et al.), CFG-Zero* and APG (Sadat et al.); see :func:`guide`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Denoised:
    """The model's estimate at one point: the clean latent and the noise (x = (1-s) x0 + s noise)."""

    x0: torch.Tensor
    noise: torch.Tensor

    @property
    def velocity(self) -> torch.Tensor:
        return self.noise - self.x0


def velocity_pair(x: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> Denoised:
    return Denoised(x - s * v, x + (1 - s) * v)


@dataclass
class GuidanceState:
    """Per-run state of a guidance method (APG's momentum)."""

    momentum: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def guide(method: str, x: torch.Tensor, s: torch.Tensor, v_c: torch.Tensor, v_u: torch.Tensor | None, cfg: float,
          step: int, state: GuidanceState, options: dict, renorm: Callable | None = None) -> Denoised:
    """Combine conditional and unconditional velocities.

    cfg:           v = v_u + w (v_c - v_u)
    cfg++:         x0 from the guided v, noise from the unconditional v (CFG++, Chung et al.)
    cfg_zero_star: s* = <v_c, v_u>/|v_u|^2; v = s* v_u + w (v_c - s* v_u); zero the first step(s)
    apg:           guidance update split into parts parallel/orthogonal to the conditional x0,
                   parallel part scaled by eta (Sadat et al.), optional norm threshold, momentum.
    """
    if v_u is None:
        return velocity_pair(x, s, v_c)
    if method == "cfg":
        v = v_u + cfg * (v_c - v_u)
        if renorm is not None:  # the family's renormalisation (Lumina 2, Qwen-Image pipelines)
            v = renorm(v, v_c)
        return velocity_pair(x, s, v)
    if method == "cfg++":
        v = v_u + cfg * (v_c - v_u)
        return Denoised(x - s * v, x + (1 - s) * v_u)
    if method == "cfg_zero_star":
        if step < int(options.get("zero_init_steps", 1)):
            return Denoised(x.clone(), x.clone())  # zero velocity
        star = _bdot(v_c, v_u) / (_bdot(v_u, v_u) + 1e-8)
        return velocity_pair(x, s, star * v_u + cfg * (v_c - star * v_u))
    if method == "apg":
        eta = float(options.get("eta", 0.0))
        threshold = float(options.get("norm_threshold", 0.0))
        momentum = float(options.get("momentum", 0.0))
        x0_c, x0_u = x - s * v_c, x - s * v_u
        diff = x0_c - x0_u
        if momentum:
            if state.momentum is not None:
                diff = diff + momentum * state.momentum
            state.momentum = diff
        if threshold > 0:
            norm = diff.flatten(1).norm(dim=1).view(-1, *([1] * (diff.dim() - 1)))
            diff = diff * torch.clamp(threshold / (norm + 1e-8), max=1.0)
        unit = x0_c / (x0_c.flatten(1).norm(dim=1).view(-1, *([1] * (x0_c.dim() - 1))) + 1e-8)
        parallel = _bdot(diff, unit) * unit
        update = (diff - parallel) + eta * parallel
        x0 = x0_c + (cfg - 1) * update
        v = (x - x0) / s.clamp(min=1e-6)
        return Denoised(x0, x + (1 - s) * v)
    raise ValueError(f"unknown guidance {method!r}; expected one of {', '.join(GUIDANCE)}")


GUIDANCE = ["cfg", "cfg++", "cfg_zero_star", "apg"]


def renorm_of(model: Any) -> Callable | None:
    """The family's guided-velocity renormalisation, or None when its pipeline does none."""
    return model.info.renorm_guided if model.info.cfg_renorm else None
