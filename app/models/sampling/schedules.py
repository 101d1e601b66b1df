"""Schedules: flow sigmas (decreasing to 0) for a model, by scheduler name."""

from __future__ import annotations

import math

import numpy as np
import torch

from app.models import families
from app.models.handles import ModelHandle


def _shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def model_shift(model: ModelHandle, shift: float = 0.0) -> float:
    """``shift`` if > 0, else the model's default (manifest, scheduler config, family)."""
    if shift and shift > 0:
        return float(shift)
    config = model.scheduler_config
    for value in (model.defaults.get("shift"), config.get("shift"), config.get("flow_shift")):
        if value:
            return float(value)
    return float(model.info.default_shift)


def auto_scheduler(model: ModelHandle) -> str:
    if model.info.prediction == "eps":
        return "discrete"
    if model.scheduler_config.get("use_dynamic_shifting"):
        return "dynamic"
    if not model.scheduler_config and model.info.default_scheduler == "dynamic":
        return "dynamic"
    return "shifted"


def compute_sigmas(model: ModelHandle, scheduler: str, steps: int, shift: float = 0.0,
                   latent_hw: tuple[int, int] | None = None, denoise: float = 1.0) -> torch.Tensor:
    """Flow sigmas (steps + 1 values, decreasing, last 0) for ``model``.

    shifted: s = 1 - i/n, then s' = shift*s/(1+(shift-1)s) (static shift; shapes-dit, SD3).
    dynamic: Flux/SD3.5 resolution-dependent exponential shift, mu from the token count.
    linear:  s = 1 - i/n.  karras: Karras ramp (rho 7) between the shifted schedule's ends.
    discrete: eps models: evenly spaced training timesteps (diffusers' "linspace" spacing).
    denoise < 1 keeps the last ``steps`` of a schedule of steps/denoise steps (img2img).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if scheduler in ("auto", "", None):
        scheduler = auto_scheduler(model)
    total = steps if denoise >= 1.0 else max(steps, int(steps / max(denoise, 1e-4)))
    t = torch.linspace(1.0, 0.0, total + 1, dtype=torch.float64)
    if scheduler == "shifted":
        s = _shift(t, model_shift(model, shift))
    elif scheduler in ("linear", "simple"):
        s = t
    elif scheduler == "dynamic":
        h, w = latent_hw or (model.defaults.get("height", 1024) // 8, model.defaults.get("width", 1024) // 8)
        mu = families.dynamic_mu(model.image_seq_len(h, w), model.scheduler_config)
        if shift and shift > 0:  # an explicit shift overrides the resolution rule
            s = _shift(t, shift)
        else:
            s = torch.where(t > 0, math.exp(mu) / (math.exp(mu) + (1 / t.clamp(min=1e-12) - 1)), torch.zeros_like(t))
    elif scheduler == "karras":
        base = _shift(t, model_shift(model, shift))
        hi, lo, rho = float(base[0]), float(base[-2]) if total > 1 else float(base[0]) * 0.01, 7.0
        ramp = torch.linspace(0, 1, total, dtype=torch.float64)
        s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        s = torch.cat([s, torch.zeros(1, dtype=torch.float64)])
    elif scheduler == "discrete":
        if model.info.prediction != "eps":
            s = _shift(t, model_shift(model, shift))
        else:
            table = model.sigma_table().numpy()
            n = len(table)
            timesteps = np.linspace(0, n - 1, total, dtype=np.float32)[::-1].copy()
            ve = np.interp(timesteps, np.arange(n), table)
            s = torch.cat([torch.from_numpy(ve / (1 + ve)), torch.zeros(1, dtype=torch.float64)])
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    if model.info.prediction == "eps" and scheduler != "discrete":
        s = s * model.sigma_max  # eps models have no pure-noise endpoint
    s = s.float()
    return s[-(steps + 1):].clone()


SCHEDULERS = ["auto", "shifted", "dynamic", "linear", "karras", "discrete"]
