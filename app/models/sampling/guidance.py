"""Guidance: turn conditional/unconditional velocities into a denoised pair (x0, noise).

Methods: CFG, CFG++ (Chung et al.), CFG-Zero* and APG (Sadat et al.); see :func:`guide`.
Plain CFG's combination can be adjusted: a family's own renormalisation (Lumina 2, Qwen-Image
pipelines), or adjustments a MODEL carries (``ModelHandle.cfg_patches``: :class:`CFGNorm`,
:class:`FreSca`, as ComfyUI's nodes of those names); :func:`renorm_of` gives the combination.
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
        if renorm is not None:  # the family's renormalisation, or the model's CFG adjustments
            return velocity_pair(x, s, renorm(x, s, v_c, v_u, cfg))
        return velocity_pair(x, s, v_u + cfg * (v_c - v_u))
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


@dataclass(frozen=True)
class CFGNorm:
    """ComfyUI's CFGNorm. Default: the guided x0 is scaled down (never up) to the conditional x0's
    norm over channels at each position, then by ``strength``. ``pre_cfg``: the guided velocity is
    rescaled to the conditional one's norm (up or down), blended with plain CFG by ``strength``."""

    strength: float = 1.0
    pre_cfg: bool = False

    def after(self, x: torch.Tensor, s: torch.Tensor, v: torch.Tensor, v_c: torch.Tensor) -> torch.Tensor:
        if self.pre_cfg:
            norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
            ratio = torch.where(norm > 0, torch.linalg.vector_norm(v_c, dim=1, keepdim=True) / norm.clamp(min=1e-12), 1.0)
            return self.strength * v * ratio + (1 - self.strength) * v
        x0, x0_c = x - s * v, x - s * v_c
        scale = (torch.linalg.vector_norm(x0_c, dim=1, keepdim=True)
                 / (torch.linalg.vector_norm(x0, dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
        return (x - x0 * scale * self.strength) / s.clamp(min=1e-6)


@dataclass(frozen=True)
class FreSca:
    """ComfyUI's FreSca (frequency-dependent guidance scaling): the guidance difference v_c - v_u is
    scaled by ``scale_low`` on the central (low) frequencies of its centred 2-D spectrum, up to
    ``freq_cutoff`` indices from the centre along each axis after the channels (as ComfyUI's mask
    does), and by ``scale_high`` elsewhere, before CFG combines."""

    scale_low: float = 1.0
    scale_high: float = 1.25
    freq_cutoff: int = 20

    def before(self, v_c: torch.Tensor, v_u: torch.Tensor) -> torch.Tensor:
        diff = (v_c - v_u).float()
        spectrum = torch.fft.fftshift(torch.fft.fftn(diff, dim=(-2, -1)), dim=(-2, -1))
        mask = torch.full(diff.shape, float(self.scale_high), device=diff.device)
        centre = mask
        for dim in range(2, diff.dim()):
            half = diff.shape[dim] // 2
            cut = min(self.freq_cutoff, half)
            centre = centre.narrow(dim, half - cut, 2 * cut)
        centre.fill_(float(self.scale_low))
        filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
        return v_u + filtered.to(v_c.dtype)


def renorm_of(model: Any) -> Callable | None:
    """How plain CFG combines for this model: ``(x, s, v_c, v_u, cfg) -> guided velocity``, or None
    for ``v_u + cfg (v_c - v_u)``. The model's CFG adjustments (CFGNorm, FreSca) apply in order; a
    CFGNorm replaces the family's own renormalisation (as it does in ComfyUI, which has none)."""
    patches = tuple(getattr(model, "cfg_patches", ()) or ())
    family = model.info.renorm_guided if model.info.cfg_renorm else None
    if not patches and family is None:
        return None

    def combine(x: torch.Tensor, s: torch.Tensor, v_c: torch.Tensor, v_u: torch.Tensor, cfg: float) -> torch.Tensor:
        for patch in patches:
            if hasattr(patch, "before"):
                v_c = patch.before(v_c, v_u)
        v = v_u + cfg * (v_c - v_u)
        after = [patch for patch in patches if hasattr(patch, "after")]
        for patch in after:
            v = patch.after(x, s, v, v_c)
        return family(v, v_c) if family is not None and not after else v

    return combine
