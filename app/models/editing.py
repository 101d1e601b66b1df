"""Editing loops for flow-matching DiTs: flow-ODE inversion, RF-Edit, RF-Inversion, FlowEdit.

Everything runs in the engine's flow convention (x_s = (1 - s) x0 + s noise, v = noise - x0;
see app/models/sampling), so every family we load works, PixArt's eps models included: their
outputs are turned into velocities by ``ModelHandle.predict``.

- img2img / inpaint: :func:`app.models.sampling.sample` with ``denoise`` < 1 and a latent noise
  mask (the input, re-noised to the current sigma, is put back outside the mask after every
  step). The mask may be grown and feathered first (:func:`blend_mask`); a latent pixel is
  regenerated as much as the most-masked image pixel it covers, so nothing masked is ever kept.
- Inversion (:func:`invert`): integrate dx/ds = v(x, s) from the image (s = 0) up to the noise
  end with Euler or RF-Solver (2nd order: x += Δ v + ½ Δ² v', v' from a half step; for eps models
  the same step is taken in DDIM's coordinates, see ``samplers.sample_rf_solver_eps``). RF-Edit
  (Wang et al. 2024) also records the attention values V of late blocks during the last
  inversion steps (an :class:`AttentionValuePatch` in record mode) and substitutes them during
  the first editing steps (inject mode). Record and inject are paired by *interval*: inversion
  step i and the editing step that crosses the same sigma interval (and the same evaluation
  within the step), as in the authors' code.
- RF-Inversion (Rout et al. 2024): inversion follows û = v + γ (u_cond − v) with the
  straight-line field to a fixed noise sample u_cond = (y1 − x)/(1 − s); generation follows
  v̂ = v + η ((x − y0)/s − v) towards the source y0 for the steps in [start, stop).
- FlowEdit (Kulikov et al. 2024), inversion-free: z = x_src; over the last n_max steps,
  z_src = (1 − s) x_src + s ε, z_tar = z + z_src − x_src, z += (s' − s) (v_tar(z_tar) − v_src(z_src)),
  averaged over n_avg draws of ε; the last n_min steps (optional) sample z_tar plainly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from app.core.context import current
from app.models.handles import ModelHandle, batchable, cat_conds, expand_cond
from app.models.masks import as_mask, blur, grow
from app.models.patches.attention_values import AttentionValuePatch, late_blocks
from app.models.sampling import GuidanceState, Previewer, guide, integrate, make_noise
from app.models.sampling.guidance import renorm_of

SOLVERS = ["euler", "rf_solver"]  # one-step solvers that never evaluate at the top sigma (inversion)


@dataclass(eq=False)
class Inversion:
    """The INVERSION value: the result of integrating the flow ODE from an image to noise.

    ``latent`` is x at the top sigma, ``source`` the clean latent that was inverted,
    ``sigmas`` the increasing schedule (``sigmas[0] = 0``), ``trajectory`` x at every sigma
    (CPU), ``values`` the RF-Edit attention values keyed by ((interval, evaluation), block)
    for the intervals in ``stored_intervals``.
    """

    latent: torch.Tensor
    source: torch.Tensor
    sigmas: torch.Tensor
    trajectory: list[torch.Tensor]
    solver: str
    family: str
    values: dict = field(default_factory=dict)
    value_blocks: tuple[str, ...] = ()
    stored_intervals: tuple[int, ...] = ()
    batch_index: list[int] | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def cache_nbytes(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        tensors = [self.latent, self.source, self.sigmas, *self.trajectory, *self.values.values()]
        for t in tensors:
            totals[t.device.type] = totals.get(t.device.type, 0) + t.numel() * t.element_size()
        return totals

    def offload(self) -> None:
        self.values = {k: v.cpu() for k, v in self.values.items()}


@torch.no_grad()
def invert(
    model: ModelHandle,
    source: torch.Tensor,
    positive: Any,
    sigmas: torch.Tensor,
    negative: Any | None = None,
    cfg: float = 1.0,
    *,
    solver: str = "rf_solver",
    guidance: str = "cfg",
    gamma: float = 0.0,
    seed: int = 0,
    store_steps: int = 0,
    value_blocks: int = 0,
    batch_index: list[int] | None = None,
    progress: Callable | None = None,
    preview: bool = True,
) -> Inversion:
    """Integrate the flow ODE from the clean ``source`` latent up the (decreasing) schedule
    ``sigmas`` reversed. ``gamma`` > 0: RF-Inversion's controlled ODE towards seeded noise.
    ``store_steps`` > 0: record late-block attention values of the last ``store_steps`` steps."""
    if solver not in SOLVERS:
        raise ValueError(f"inversion solver must be one of {', '.join(SOLVERS)} (got {solver!r})")
    up = torch.as_tensor(sigmas, dtype=torch.float32).cpu().flip(0)
    if float(up[0]) != 0.0 or float(up[-1]) <= 0.0:
        raise ValueError("inversion needs a schedule ending at sigma 0 (from a Scheduler or compute_sigmas)")
    steps = len(up) - 1
    device = model.device
    x0 = source.float().to(device)
    trajectory = [source.float().cpu().clone()]
    controller = None
    if gamma > 0:
        target = make_noise(tuple(source.shape), seed, batch_index).to(device)

        def controller(x: torch.Tensor, s: float, v: torch.Tensor, i: int) -> torch.Tensor:
            return v + gamma * ((target - x) / max(1.0 - s, 1e-6) - v)

    stored = tuple(range(max(0, steps - store_steps), steps)) if store_steps > 0 else ()
    blocks: tuple[str, ...] = ()
    handle = model
    if stored:
        blocks = late_blocks(model.transformer, value_blocks)
        handle = model.with_patch(AttentionValuePatch("record", blocks))
    wanted = set(stored)

    def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
        trajectory.append(x.float().cpu().clone())
        return x

    x, extras = integrate(handle, x0, up, positive, negative, cfg, guidance=guidance, solver=solver, eps_variant=True,
                          controller=controller, value_interval=lambda i: i if i in wanted else None,
                          after_step=after_step, progress=progress, seed=seed, preview=preview)
    values = extras.get("attention_values", {}) if stored else {}
    return Inversion(x.float().cpu(), source.float().cpu(), up, trajectory, solver, model.family, values, blocks,
                     stored, batch_index)


def blend_mask(mask: torch.Tensor | None, like: torch.Tensor, grow_px: int = 0, blur_px: float = 0.0) -> torch.Tensor | None:
    """An image- or latent-sized mask -> (B, 1, h, w) at the latent's size (1 = change)."""
    if mask is None:
        return None
    m = as_mask(mask)
    if grow_px:
        m = grow(m, grow_px)
    if blur_px > 0:
        m = blur(m, blur_px)
    h, w = like.shape[-2:]
    if m.shape[-2:] != (h, w):
        # a latent pixel changes as much as the most-masked image pixel it covers
        m = F.adaptive_max_pool2d(m[:, None], (h, w))[:, 0]
    m = m[:, None].to(like.device)
    if m.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"mask batch {m.shape[0]} does not match the latent batch {like.shape[0]}")
    return m


@torch.no_grad()
def edit_from_inversion(
    model: ModelHandle,
    inversion: Inversion,
    positive: Any,
    negative: Any | None = None,
    cfg: float = 1.0,
    *,
    solver: str = "same",
    guidance: str = "cfg",
    inject_steps: int = 0,
    eta: float = 0.0,
    eta_start: float = 0.0,
    eta_stop: float = 0.25,
    mask: torch.Tensor | None = None,
    progress: Callable | None = None,
    preview: bool = True,
) -> torch.Tensor:
    """Sample from an inverted latent back down its schedule under a (new) prompt.

    RF-Edit: the recorded attention values replace the model's for the first ``inject_steps``
    steps. RF-Inversion: for steps in [eta_start, eta_stop) (fractions of the steps) the velocity
    is pulled towards the source: v̂ = v + η ((x − y0)/s − v). ``mask`` (1 = edit): outside it,
    x follows the inversion trajectory back to the source exactly.
    """
    solver = inversion.solver if solver in ("same", "", None) else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver must be 'same' or one of {', '.join(SOLVERS)} (got {solver!r})")
    if inversion.family not in (model.family,):
        raise ValueError(f"the inversion was made with a {inversion.family} model, this model is {model.family}")
    down = inversion.sigmas.flip(0)
    steps = len(down) - 1
    device = model.device
    handle = model
    inject = set()
    if inject_steps > 0:
        if not inversion.values:
            raise ValueError("this inversion stored no attention values: set store_steps > 0 on the inversion "
                             "node (at least as many as inject_steps)")
        inject = {j for j in range(min(inject_steps, steps)) if steps - 1 - j in inversion.stored_intervals}
        handle = model.with_patch(AttentionValuePatch("inject", inversion.value_blocks, inversion.values))
    controller = None
    if eta > 0:
        y0 = inversion.source.to(device)
        first, last = round(eta_start * steps), round(eta_stop * steps)

        def controller(x: torch.Tensor, s: float, v: torch.Tensor, j: int) -> torch.Tensor:
            if not first <= j < last:
                return v
            return v + eta * ((x - y0) / max(s, 1e-6) - v)

    m = blend_mask(mask, inversion.latent)
    m = None if m is None else m.to(device)
    after_step = None
    if m is not None:
        def after_step(j: int, x: torch.Tensor) -> torch.Tensor:
            reference = inversion.trajectory[steps - 1 - j].to(device)
            return m * x + (1 - m) * reference

    x, _ = integrate(handle, inversion.latent, down, positive, negative, cfg, guidance=guidance, solver=solver, eps_variant=True,
                     controller=controller, value_interval=lambda j: steps - 1 - j if j in inject else None,
                     after_step=after_step, progress=progress, preview=preview)
    return x.float().cpu()


def _stack(first: Any, second: Any, batch: int) -> Any | None:
    """One conditioning of 2*batch rows: ``first`` for rows [0, batch), ``second`` after; None
    when the two cannot be batched (different token counts, extras)."""
    a, b = expand_cond(first, batch), expand_cond(second, batch)
    return cat_conds([a, b]) if batchable([a, b]) else None


@dataclass
class _FlowEditGuide:
    """Guided source/target velocities for FlowEdit, batched as one call when the prompts allow."""

    model: ModelHandle
    source_cond: Any
    target_cond: Any
    negative: Any | None
    guidance: str
    cfgs: tuple[float, float]
    batch: int
    start: int
    states: tuple[GuidanceState, GuidanceState] = field(default_factory=lambda: (GuidanceState(), GuidanceState()))

    def __post_init__(self) -> None:
        source_cfg, target_cfg = self.cfgs
        self.uses_uncond = self.negative is not None and not (
            self.guidance == "cfg" and source_cfg == 1.0 and target_cfg == 1.0)
        self.both = _stack(self.source_cond, self.target_cond, self.batch)
        self.negatives = _stack(self.negative, self.negative, self.batch) if self.uses_uncond else None

    def _one(self, x: torch.Tensor, s: float, cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.uses_uncond:
            vu, vc = self.model.predict_many(x, s, [self.negative, cond])
            return vc, vu
        return self.model.predict(x, s, cond), None

    def _raw(self, s: float, z_src: torch.Tensor | None, z_tar: torch.Tensor) -> tuple:
        """(v_c, v_u) at z_src (None when skipped) and at z_tar."""
        batched = self.both is not None and (self.negatives is not None or not self.uses_uncond)
        if z_src is not None and batched:
            latents = torch.cat([z_src, z_tar])
            if self.uses_uncond:
                v_u, v_c = self.model.predict_many(latents, s, [self.negatives, self.both])
                vu_s, vu_t = v_u.chunk(2)
            else:
                v_c, vu_s, vu_t = self.model.predict(latents, s, self.both), None, None
            vc_s, vc_t = v_c.chunk(2)
            return (vc_s, vu_s), (vc_t, vu_t)
        src = self._one(z_src, s, self.source_cond) if z_src is not None else None
        return src, self._one(z_tar, s, self.target_cond)

    def __call__(self, i: int, s: float, z_src: torch.Tensor | None, z_tar: torch.Tensor) -> tuple:
        """Guided source velocity at z_src (None: skip) and target velocity at z_tar."""
        s_t = torch.full((self.batch,) + (1,) * (z_tar.dim() - 1), s, device=z_tar.device)
        src, tar = self._raw(s, z_src, z_tar)
        renorm = renorm_of(self.model)
        v_tar = guide(self.guidance, z_tar, s_t, *tar, self.cfgs[1], i - self.start, self.states[1], {}, renorm).velocity
        if z_src is None:
            return None, v_tar
        v_src = guide(self.guidance, z_src, s_t, *src, self.cfgs[0], i - self.start, self.states[0], {}, renorm).velocity
        return v_src, v_tar


def _flow_edit_step(velocities: _FlowEditGuide, z: torch.Tensor, x_src: torch.Tensor, i: int, s: float,
                    s_next: float, n_avg: int, seed: int, batch_index: list[int] | None) -> torch.Tensor:
    """One FlowEdit step: z += (s' - s) * mean over ε of (v_tar(z_tar) - v_src(z_src))."""
    delta = torch.zeros_like(z)
    for k in range(n_avg):
        eps = make_noise(tuple(x_src.shape), _noise_seed(seed, i, k), batch_index).to(x_src.device)
        z_src = (1 - s) * x_src + s * eps
        v_src, v_tar = velocities(i, s, z_src, z + z_src - x_src)
        delta += (v_tar - v_src) / n_avg
    return z + (s_next - s) * delta


@torch.no_grad()
def flow_edit(
    model: ModelHandle,
    source: torch.Tensor,
    source_cond: Any,
    target_cond: Any,
    sigmas: torch.Tensor,
    negative: Any | None = None,
    *,
    source_cfg: float = 1.5,
    target_cfg: float = 5.5,
    n_max: int = 24,
    n_min: int = 0,
    n_avg: int = 1,
    seed: int = 0,
    guidance: str = "cfg",
    mask: torch.Tensor | None = None,
    batch_index: list[int] | None = None,
    progress: Callable | None = None,
    preview: bool = True,
) -> torch.Tensor:
    """FlowEdit: edit ``source`` (clean latent) from ``source_cond`` to ``target_cond`` without inversion."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    total = len(sigmas) - 1
    n_max = max(0, min(n_max, total))
    n_min = max(0, min(n_min, n_max))
    x_src = source.float().to(model.device)
    z, x_tar, regen_noise = x_src.clone(), None, torch.zeros_like(x_src)
    m = blend_mask(mask, x_src)
    progress = progress or current().progress
    start = total - n_max
    velocities = _FlowEditGuide(model, source_cond, target_cond, negative, guidance, (source_cfg, target_cfg),
                                x_src.shape[0], start)
    previews = Previewer(model, preview)
    with model.sampling_run(sigmas, seed=seed) as run:
        for i in range(start, total):
            run.step = i
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            if total - i > n_min:
                z = _flow_edit_step(velocities, z, x_src, i, s, s_next, n_avg, seed, batch_index)
                if m is not None:
                    z = m * z + (1 - m) * x_src
                shown = z
            else:  # the last n_min steps: plain sampling of the target from z's re-noised point
                if x_tar is None:
                    regen_noise = make_noise(tuple(x_src.shape), _noise_seed(seed, i, 0), batch_index).to(x_src.device)
                    x_tar = z + (1 - s) * x_src + s * regen_noise - x_src
                x_tar = x_tar + (s_next - s) * velocities(i, s, None, x_tar)[1]
                if m is not None:
                    x_tar = m * x_tar + (1 - m) * ((1 - s_next) * x_src + s_next * regen_noise)
                shown = x_tar
            progress(i - start + 1, n_max, previews(i - start + 1, n_max, shown))
    out = z if x_tar is None else x_tar
    return out.float().cpu()


def _noise_seed(seed: int, step: int, draw: int) -> int:
    return (int(seed) * 1_000_003 + step * 1009 + draw) % (2**63)
