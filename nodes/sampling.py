"""Sampling: schedules (SIGMAS), guidance (CFG, CFG++, CFG-Zero*, APG), ODE samplers, the loop.

Everything works in the engine's flow convention: x_s = (1 - s) x0 + s noise, the model
returns v = noise - x0 (``ModelHandle.predict``), and a schedule is a decreasing tensor of
flow sigmas ending at 0. Guidance turns the conditional/unconditional velocities into a
*denoised pair* (x0, noise); a sampler steps with those. For plain CFG every sampler equals its
textbook velocity form (Euler: x += (s' - s) v).

:func:`sample` is the one loop the Sampler nodes and the editing nodes share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch

from app.models import families
from app.core.context import current
from app.models.handles import ModelHandle
from app.core.registry import Link, node
from app.core.types import CONDITIONING, LATENT, MODEL, SIGMAS, Spec
from nodes.latent import Latent

SEED_MAX = 2**63 - 1
PREVIEW_INTERVAL = 0.25  # seconds between latent previews


# ---------------------------------------------------------------------------------------------
# schedules


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
                   latent_hw: tuple[int, ...] | None = None, denoise: float = 1.0) -> torch.Tensor:
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
        dims = latent_hw or (model.defaults.get("height", 1024) // 8, model.defaults.get("width", 1024) // 8)
        mu = families.dynamic_mu(model.image_seq_len(*dims), model.scheduler_config)
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


# ---------------------------------------------------------------------------------------------
# guidance: (v_cond, v_uncond) -> denoised pair


@dataclass
class Denoised:
    """The model's estimate at one point: the clean latent and the noise (x = (1-s) x0 + s noise)."""

    x0: torch.Tensor
    noise: torch.Tensor

    @property
    def velocity(self) -> torch.Tensor:
        return self.noise - self.x0


def _pair(x: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> Denoised:
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
        return _pair(x, s, v_c)
    if method == "cfg":
        v = v_u + cfg * (v_c - v_u)
        if renorm is not None:  # the family's renormalisation (Lumina 2, Qwen-Image pipelines)
            v = renorm(v, v_c)
        return _pair(x, s, v)
    if method == "cfg++":
        v = v_u + cfg * (v_c - v_u)
        return Denoised(x - s * v, x + (1 - s) * v_u)
    if method == "cfg_zero_star":
        if step < int(options.get("zero_init_steps", 1)):
            return Denoised(x.clone(), x.clone())  # zero velocity
        star = _bdot(v_c, v_u) / (_bdot(v_u, v_u) + 1e-8)
        return _pair(x, s, star * v_u + cfg * (v_c - star * v_u))
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


# ---------------------------------------------------------------------------------------------
# samplers: (x, sigmas, denoise_fn, callback) -> x


DenoiseFn = Callable[[torch.Tensor, float, int], Denoised]


def sample_euler(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        s_next = float(sigmas[i + 1])
        d = fn(x, float(sigmas[i]), i)
        x = (1 - s_next) * d.x0 + s_next * d.noise
        callback(i, x, d)
    return x


def sample_heun(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable) -> torch.Tensor:
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


def sample_rf_solver(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable) -> torch.Tensor:
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


def sample_dpmpp_2m(x: torch.Tensor, sigmas: torch.Tensor, fn: DenoiseFn, callback: Callable) -> torch.Tensor:
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


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "rf_solver": sample_rf_solver,
    "dpmpp_2m": sample_dpmpp_2m,
}


# ---------------------------------------------------------------------------------------------
# previews

_PREVIEW_CACHE: dict[tuple, torch.Tensor] = {}


def _preview_latent(x0: torch.Tensor, max_size: int) -> torch.Tensor:
    """The first item of ``x0``, subsampled to at most ``max_size`` pixels a side (on its device)."""
    latent = x0[0] if x0.dim() == 4 else x0[0, :, 0]  # videos: the first frame
    step = max(1, math.ceil(max(latent.shape[-2:]) / max_size))
    return latent[:, ::step, ::step].float()


def _preview_rgb(model: ModelHandle, latent: torch.Tensor) -> np.ndarray:
    """RGB uint8 (h, w, 3) of a small CPU latent (c, h, w); see :func:`preview_image`."""
    c = latent.shape[0]
    fitted = model.preview_projection()
    if fitted is not None:
        flat = torch.cat([latent.reshape(c, -1), torch.ones(1, latent[0].numel())]).T
        rgb = (flat @ fitted).reshape(latent.shape[1], latent.shape[2], 3).clamp(0, 1)
    else:
        matrix = model.defaults.get("preview_rgb")
        if matrix is not None:
            proj = torch.tensor(matrix, dtype=torch.float32)
        else:
            key = (model.family, c)
            if key not in _PREVIEW_CACHE:
                g = torch.Generator().manual_seed(c)
                q, _ = torch.linalg.qr(torch.randn(c, max(c, 3), generator=g))
                _PREVIEW_CACHE[key] = q[:, :3] if c >= 3 else torch.eye(c, 3)
            proj = _PREVIEW_CACHE[key]
        rgb = torch.einsum("chw,cd->hwd", latent, proj)
        lo, hi = rgb.amin(dim=(0, 1)), rgb.amax(dim=(0, 1))
        rgb = (rgb - lo) / (hi - lo).clamp(min=1e-6)
    return (rgb * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def preview_image(model: ModelHandle, x0: torch.Tensor, max_size: int = 64) -> np.ndarray:
    """A cheap RGB preview of a latent: a fixed linear projection of the channels (uint8 HxWx3).

    The projection is fitted once per model from its VAE (``ModelHandle.preview_projection``,
    when the checkpoint came with one), else a manifest's ``preview_rgb`` matrix, else a fixed
    pseudo-random orthogonal projection (normalised per image) so colours are at least stable.
    """
    return _preview_rgb(model, _preview_latent(x0, max_size).cpu())


class Previewer:
    """Latent previews for progress events that never make the GPU wait.

    At most one preview per ``interval`` seconds, plus the last step. A synchronous copy to the
    host would drain the GPU's queue at every preview, leaving it idle while the CPU launches
    the next transformer call. So on CUDA the copy goes to pinned memory without blocking, and
    its image is made at a later step, once the copy's event has completed. The last step's
    preview is made at once (the sampler synchronises there anyway).
    """

    def __init__(self, model: ModelHandle, enabled: bool = True, interval: float = PREVIEW_INTERVAL, max_size: int = 64):
        self.model, self.enabled, self.interval, self.max_size = model, enabled, interval, max_size
        self._last = -math.inf
        self._pending: tuple[torch.Tensor, Callable[[], bool]] | None = None

    def __call__(self, step: int, total: int, x0: torch.Tensor) -> np.ndarray | None:
        """The preview to send with step ``step`` of ``total`` (1-based), or None."""
        if not self.enabled:
            return None
        if step >= total:
            self._pending = None
            return preview_image(self.model, x0, self.max_size)
        image = None
        if self._pending is not None and self._pending[1]():
            image = _preview_rgb(self.model, self._pending[0])
            self._pending = None
        now = time.perf_counter()
        if self._pending is None and now - self._last >= self.interval:
            self._last = now
            host, ready = self._start_copy(_preview_latent(x0, self.max_size))
            if ready():
                image = _preview_rgb(self.model, host)
            else:
                self._pending = (host, ready)
        return image

    @staticmethod
    def _start_copy(latent: torch.Tensor) -> tuple[torch.Tensor, Callable[[], bool]]:
        """Start copying ``latent`` to the host: (host tensor, has the copy landed?)."""
        if latent.device.type != "cuda":
            return latent.cpu(), lambda: True
        host = torch.empty(latent.shape, dtype=latent.dtype, pin_memory=True)
        host.copy_(latent, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done.query


# ---------------------------------------------------------------------------------------------
# the loop


def make_noise(shape: tuple[int, ...], seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """Seeded Gaussian noise generated on CPU (identical on every device). With ``batch_index``,
    item k gets the noise it would have had at position batch_index[k] of a larger batch."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed) % (2**64))
    if batch_index:
        count = max(batch_index) + 1
        full = torch.randn((count, *shape[1:]), generator=generator, dtype=torch.float32)
        return full[list(batch_index)]
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _latent_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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

    The start is x = (1 - s0) x0 + k s0-noise with k chosen as the pipelines do: at the model's
    top sigma (full denoise) the noise is scaled by sqrt(s0^2 + (1-s0)^2) (exactly ``noise`` for
    flow models), else by s0 (img2img). ``denoise`` < 1 keeps only the last fraction of
    ``sigmas``. A ``noise_mask`` in the latent (1 = regenerate) keeps the rest of the input.
    ``progress(step, total, preview)`` is called after each step (defaults to the run context).
    ``add_noise=False`` takes the latent as already noised to ``sigmas[0]`` (second stage of a
    split schedule).
    """
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}; expected one of {', '.join(SAMPLERS)}")
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r}; expected one of {', '.join(GUIDANCE)}")
    check_inputs(model, latent, positive, negative)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    if denoise < 1.0:
        keep = max(1, round((len(sigmas) - 1) * denoise))
        sigmas = sigmas[-(keep + 1):]
    steps = len(sigmas) - 1
    options = dict(guidance_options or {})
    progress = progress or current().progress
    device = model.device
    x0_in = latent.samples.float()
    if noise is None:
        noise = make_noise(tuple(x0_in.shape), seed, latent.batch_index)
    noise = noise.to(device, torch.float32)
    x0_in = x0_in.to(device)
    s0 = float(sigmas[0])
    full = s0 >= model.sigma_max - 1e-4
    scale = math.sqrt(s0 * s0 + (1 - s0) ** 2) if full else s0
    x = (1 - s0) * x0_in + scale * noise if add_noise else x0_in.clone()
    mask = _latent_mask(latent.noise_mask, x) if latent.noise_mask is not None else None
    use_uncond = negative is not None and not (guidance == "cfg" and cfg == 1.0)
    renorm = model.info.renorm_guided if model.info.cfg_renorm else None
    state = GuidanceState()

    with model.sampling_run(sigmas, seed=seed) as run:

        def denoise_fn(x_t: torch.Tensor, s: float, i: int) -> Denoised:
            run.step = i
            s_t = torch.full((x_t.shape[0],) + (1,) * (x_t.dim() - 1), s, device=device)  # images and videos
            if use_uncond:
                v_u, v_c = model.predict_many(x_t, s, [negative, positive])
            else:
                v_c, v_u = model.predict(x_t, s, positive), None
            return guide(guidance, x_t, s_t, v_c, v_u, cfg, i, state, options, renorm)

        previews = Previewer(model, preview)

        def callback(i: int, x_t: torch.Tensor, d: Denoised) -> None:
            progress(i + 1, steps, previews(i + 1, steps, d.x0))

        if mask is None:
            x = SAMPLERS[sampler_name](x, sigmas, denoise_fn, callback)
        else:
            # inpainting: after every step, put back the (re-noised) input outside the mask
            for i in range(steps):
                x = SAMPLERS[sampler_name](x, sigmas[i:i + 2], lambda xt, s, _j, i=i: denoise_fn(xt, s, i),
                                           lambda _j, xt, d, i=i: callback(i, xt, d))
                s_next = float(sigmas[i + 1])
                x = mask * x + (1 - mask) * ((1 - s_next) * x0_in + s_next * noise)
    return Latent(x.float().cpu(), latent.noise_mask, latent.batch_index)


# ---------------------------------------------------------------------------------------------
# nodes


@node(category="sampling", outputs={"latent": LATENT})
def Sampler(
    model: MODEL,
    positive: CONDITIONING,
    latent: LATENT,
    negative: Link(CONDITIONING, "Unconditional/negative prompt; leave empty for none (cfg is then ignored).", optional=True) = None,
    seed: Annotated[int, Spec(min=0, max=SEED_MAX, seed=True, tooltip="Same seed, same image.")] = 0,
    steps: Annotated[int, Spec(min=1, max=1000)] = 28,
    cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1, tooltip="Guidance scale (1 = no guidance).")] = 4.0,
    sampler: Annotated[str, Spec(choices=list(SAMPLERS))] = "euler",
    scheduler: Annotated[str, Spec(choices=SCHEDULERS, tooltip="auto: the model's own (shifted, dynamic or discrete).")] = "auto",
    shift: Annotated[float, Spec(min=0.0, max=100.0, step=0.05, tooltip="Timestep shift; 0 = the model's default.")] = 0.0,
    guidance: Annotated[str, Spec(choices=GUIDANCE, tooltip="How cond and uncond are combined.")] = "cfg",
    denoise: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="< 1: keep part of the input latent (img2img).")] = 1.0,
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
    steps: Annotated[int, Spec(min=1, max=1000)] = 28,
    scheduler: Annotated[str, Spec(choices=SCHEDULERS)] = "auto",
    shift: Annotated[float, Spec(min=0.0, max=100.0, step=0.05, tooltip="0 = the model's default.")] = 0.0,
    denoise: Annotated[float, Spec(min=0.0, max=1.0, step=0.01)] = 1.0,
    width: Annotated[int, Spec(min=16, max=16384, step=16, tooltip="Image width (dynamic shift only).")] = 1024,
    height: Annotated[int, Spec(min=16, max=16384, step=16, tooltip="Image height (dynamic shift only).")] = 1024,
) -> torch.Tensor:
    """The noise levels (flow sigmas) a sampler will step through."""
    factor = model.info.vae_factor
    return compute_sigmas(model, scheduler, steps, shift, (height // factor, width // factor), denoise)


@node(category="sampling", outputs={"latent": LATENT})
def SamplerCustom(
    model: MODEL,
    positive: CONDITIONING,
    latent: LATENT,
    sigmas: SIGMAS,
    negative: Link(CONDITIONING, optional=True) = None,
    seed: Annotated[int, Spec(min=0, max=SEED_MAX, seed=True)] = 0,
    cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1)] = 4.0,
    sampler: Annotated[str, Spec(choices=list(SAMPLERS))] = "euler",
    guidance: Annotated[str, Spec(choices=GUIDANCE)] = "cfg",
    add_noise: Annotated[bool, Spec(tooltip="Off: the latent is already noised to the first sigma "
                                            "(the second half of a split schedule).")] = True,
) -> Latent:
    """Sample along given SIGMAS (from a Scheduler, or split/edited ones)."""
    return sample(model, latent, positive, negative, sigmas, seed, cfg, guidance, sampler, add_noise=add_noise)


@node(category="sampling", outputs={"high": SIGMAS, "low": SIGMAS})
def SplitSigmas(sigmas: SIGMAS, step: Annotated[int, Spec(min=0, max=1000)] = 0) -> tuple:
    """Split a schedule at ``step`` (both halves share that sigma): for two-stage sampling."""
    return sigmas[: step + 1], sigmas[step:]
