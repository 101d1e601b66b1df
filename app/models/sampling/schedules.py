"""Schedules: flow sigmas (decreasing to 0) for a model, by scheduler name.

Each schedule is registered once in :data:`SCHEDULES` as ``fn(model, n, shift, latent_hw)``
returning n + 1 float64 flow sigmas (the last 0); :func:`compute_sigmas` adds "auto", img2img
truncation and the eps models' top sigma. Few-step schedules take their timesteps from the
diffusers scheduler the distilled model ships with, so they match its pipeline exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from app.models import families
from app.models.handles import ModelHandle
from app.models.sampling.defaults import sampling_defaults

SCHEDULES: dict[str, Callable] = {}


def schedule(name: str) -> Callable[[Callable], Callable]:
    """Register a schedule ``fn(model, n, shift, latent_hw) -> n + 1 flow sigmas`` under ``name``."""
    def add(fn: Callable) -> Callable:
        SCHEDULES[name] = fn
        return fn

    return add


def _shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def _ramp(n: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)


def _with_zero(s: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.cat([torch.as_tensor(s, dtype=torch.float64).flatten(), torch.zeros(1, dtype=torch.float64)])


def _to_terminal(model: ModelHandle, s: torch.Tensor) -> torch.Tensor:
    """diffusers' ``shift_terminal`` (Qwen-Image 0.02, LTX-Video 0.1): stretch the shifted
    schedule so that its last nonzero sigma is exactly that value (the final 0 stays)."""
    terminal = model.scheduler_config.get("shift_terminal")
    if not terminal:
        return s
    one_minus = 1 - s[:-1]
    return torch.cat([1 - one_minus / (one_minus[-1] / (1 - float(terminal))), s[-1:]])


def model_shift(model: ModelHandle, shift: float = 0.0) -> float:
    """``shift`` if > 0, else the model's default (manifest, variant, scheduler config, family)."""
    if shift and shift > 0:
        return float(shift)
    config = model.scheduler_config
    variant = sampling_defaults(model).get("shift")  # e.g. HiDream-Dev's 6 from a file named *dev*
    for value in (model.defaults.get("shift"), variant, config.get("shift"), config.get("flow_shift")):
        if value:
            return float(value)
    return float(model.info.default_shift)


def auto_scheduler(model: ModelHandle) -> str:
    """The schedule a model samples with by default: its variant's/manifest's, else by its time
    convention and scheduler config."""
    preferred = sampling_defaults(model)["scheduler"]
    if preferred in SCHEDULES:
        return preferred
    if model.info.prediction == "eps":
        return "discrete"
    if model.scheduler_config.get("use_dynamic_shifting"):
        return "dynamic"
    if not model.scheduler_config and model.info.default_scheduler == "dynamic":
        return "dynamic"
    return "shifted"


@schedule("shifted")
def shifted(model: ModelHandle, n: int, shift: float, latent_hw: tuple | None) -> torch.Tensor:
    """s = 1 - i/n, then s' = shift*s/(1+(shift-1)s) (static shift; shapes-dit, SD3)."""
    return _to_terminal(model, _shift(_ramp(n), model_shift(model, shift)))


@schedule("dynamic")
def dynamic(model: ModelHandle, n: int, shift: float, latent_hw: tuple | None) -> torch.Tensor:
    """Flux/SD3.5/Qwen-Image resolution-dependent exponential shift, mu from the token count."""
    t = _ramp(n)
    if shift and shift > 0:  # an explicit shift overrides the resolution rule
        return _to_terminal(model, _shift(t, shift))
    dims = latent_hw or (model.defaults.get("height", 1024) // 8, model.defaults.get("width", 1024) // 8)
    mu = families.dynamic_mu(model.image_seq_len(*dims), model.scheduler_config)
    shifted = torch.where(t > 0, math.exp(mu) / (math.exp(mu) + (1 / t.clamp(min=1e-12) - 1)), torch.zeros_like(t))
    return _to_terminal(model, shifted)


@schedule("linear")
def linear(model: ModelHandle, n: int, shift: float, latent_hw: tuple | None) -> torch.Tensor:
    """s = 1 - i/n."""
    return _ramp(n)


@schedule("karras")
def karras(model: ModelHandle, n: int, shift: float, latent_hw: tuple | None) -> torch.Tensor:
    """Karras ramp (rho 7) between the shifted schedule's ends."""
    base = _shift(_ramp(n), model_shift(model, shift))
    hi, lo, rho = float(base[0]), float(base[-2]) if n > 1 else float(base[0]) * 0.01, 7.0
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return _with_zero((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)


def _timesteps_to_sigmas(model: ModelHandle, timesteps: np.ndarray) -> torch.Tensor:
    """Training timesteps -> flow sigmas (eps models through their sigma table)."""
    if model.info.prediction != "eps":
        return _with_zero(np.asarray(timesteps, dtype=np.float64) / model.scheduler_config.get("num_train_timesteps", 1000))
    table = model.sigma_table().numpy()
    ve = np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(table)), table)
    return _with_zero(ve / (1 + ve))


@schedule("discrete")
def discrete(model: ModelHandle, n: int, shift: float, latent_hw: tuple | None) -> torch.Tensor:
    """eps models: evenly spaced training timesteps (diffusers' "linspace" spacing)."""
    if model.info.prediction != "eps":
        return shifted(model, n, shift, latent_hw)
    count = len(model.sigma_table())
    return _timesteps_to_sigmas(model, np.linspace(0, count - 1, n, dtype=np.float32)[::-1].copy())


@schedule("turbo")
def turbo(model: ModelHandle, n: int, shift: float, latent_hw: tuple | None) -> torch.Tensor:
    """Few-step flow models (SD3.5-turbo, ADD-distilled): the timesteps of the model's own
    ``FlowMatchEulerDiscreteScheduler`` (linspace from its top to its bottom timestep, shifted),
    as its pipeline samples by default."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if model.info.prediction == "eps":
        raise ValueError("the turbo schedule is for flow models; use the lcm schedule for eps models")
    config = {**model.scheduler_config, "shift": model_shift(model, shift), "use_dynamic_shifting": False}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(n)
    return scheduler.sigmas.double()


@schedule("lcm")
def lcm(model: ModelHandle, n: int, shift: float, latent_hw: tuple | None) -> torch.Tensor:
    """Latent consistency models (PixArt-LCM): ``LCMScheduler``'s skipping timesteps over its
    original 50-step grid, e.g. 999, 759, 499, 259 for 4 steps."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(n)
    return _timesteps_to_sigmas(model, scheduler.timesteps.numpy())


@schedule("trigflow")
def trigflow(model: ModelHandle, n: int, shift: float, latent_hw: tuple | None) -> torch.Tensor:
    """sCM / TrigFlow (Sana-Sprint): ``SCMScheduler``'s angles t (π/2 .. 0; 2 steps: π/2, 1.3, 0)
    as flow sigmas s = sin t / (sin t + cos t)."""
    from diffusers import SCMScheduler

    scheduler = SCMScheduler()
    scheduler.set_timesteps(n, intermediate_timesteps=1.3 if n == 2 else None)
    t = scheduler.timesteps.double()
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


SCHEDULERS = ["auto", *SCHEDULES]


def compute_sigmas(model: ModelHandle, scheduler: str, steps: int, shift: float = 0.0,
                   latent_hw: tuple[int, ...] | None = None, denoise: float = 1.0) -> torch.Tensor:
    """Flow sigmas (steps + 1 values, decreasing, last 0) for ``model`` (see :data:`SCHEDULES`).

    ``latent_hw`` is the latent's (h, w), or (frames, h, w) for videos (dynamic shift only).
    denoise < 1 keeps the last ``steps`` of a schedule of steps/denoise steps (img2img).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if scheduler in ("auto", "", None):
        scheduler = auto_scheduler(model)
    if scheduler in ("simple",):  # ComfyUI's name for the plain ramp
        scheduler = "linear"
    if scheduler not in SCHEDULES:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of auto, {', '.join(SCHEDULES)}")
    total = steps if denoise >= 1.0 else max(steps, int(steps / max(denoise, 1e-4)))
    s = SCHEDULES[scheduler](model, total, shift, latent_hw)
    if model.info.prediction == "eps" and scheduler not in ("discrete", "lcm"):
        s = s * model.sigma_max  # eps models have no pure-noise endpoint
    return s.float()[-(steps + 1):].clone()
