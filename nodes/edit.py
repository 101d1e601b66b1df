"""Editing for flow-matching DiTs: img2img and inpainting, flow-ODE inversion, RF-Edit, RF-Inversion, FlowEdit.

Everything runs in the engine's flow convention (x_s = (1 - s) x0 + s noise, v = noise - x0;
see nodes/sampling.py), so every family we load works, PixArt's eps models included: their
outputs are turned into velocities by ``ModelHandle.predict``.

- img2img / inpaint: :func:`nodes.sampling.sample` with ``denoise`` < 1 and a latent noise mask
  (the input, re-noised to the current sigma, is put back outside the mask after every step).
  The mask may be grown and feathered first; a latent pixel is regenerated as much as the
  most-masked image pixel it covers, so nothing masked is ever kept.
- Inversion (:func:`invert`): integrate dx/ds = v(x, s) from the image (s = 0) up to the noise
  end with Euler or RF-Solver (2nd order: x += Δ v + ½ Δ² v', v' from a half step; for eps models
  the same step is taken in DDIM's coordinates, see :func:`sample_rf_solver_eps`). RF-Edit
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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from app.core.context import current
from app.models.handles import ModelHandle, ModelPatch, SamplingRun, _batchable, _cat_conds, _expand_cond
from app.core.registry import Link, node
from app.core.types import CONDITIONING, IMAGE, LATENT, MASK, MODEL, Spec
from nodes.latent import Latent
from nodes.mask import as_mask, blur, grow
from nodes.sampling import (
    GUIDANCE,
    SAMPLERS,
    SCHEDULERS,
    SEED_MAX,
    Denoised,
    GuidanceState,
    Previewer,
    compute_sigmas,
    guide,
    make_noise,
    sample,
)

INVERSION = "INVERSION"  # socket type: an :class:`Inversion`
SOLVERS = ["euler", "rf_solver"]  # one-step solvers that never evaluate at the top sigma (inversion)


# ---------------------------------------------------------------------------------------------
# values


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


# ---------------------------------------------------------------------------------------------
# RF-Edit attention-value sharing


def attention_value_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The value projections (``to_v``) of every block's self/joint attention, in depth order.

    SD3/shapes-dit/Flux double blocks: ``transformer_blocks.i.attn``; Flux single blocks:
    ``single_transformer_blocks.i.attn``; PixArt/Sana: ``transformer_blocks.i.attn1`` (self);
    Lumina 2: ``layers.i.attn``.
    """
    found = []
    for attr in ("transformer_blocks", "single_transformer_blocks", "layers"):
        blocks = getattr(transformer, attr, None)
        if blocks is None:
            continue
        for index, block in enumerate(blocks):
            attn = getattr(block, "attn1", None) or getattr(block, "attn", None)
            to_v = getattr(attn, "to_v", None) if attn is not None else None
            if isinstance(to_v, torch.nn.Module):
                found.append((f"{attr}.{index}", to_v))
    return found


def late_blocks(transformer: torch.nn.Module, count: int = 0) -> tuple[str, ...]:
    """Names of the last ``count`` attention blocks (0: the later half)."""
    names = [name for name, _ in attention_value_modules(transformer)]
    if not names:
        raise ValueError(f"{type(transformer).__name__}: no attention value projections found for RF-Edit")
    if count <= 0:
        count = max(1, math.ceil(len(names) / 2))
    return tuple(names[-count:])


class AttentionValuePatch(ModelPatch):
    """RF-Edit feature sharing as a MODEL patch.

    mode "record": while ``run.extras["value_key"]`` is set, every output of the chosen blocks'
    value projections is stored under (key, block) in a fresh per-run dict (left in
    ``run.extras["attention_values"]``). mode "inject": the stored tensor replaces the output
    for the same key (repeated along the batch when the editing batch is larger, e.g. CFG).
    """

    def __init__(self, mode: str, blocks: tuple[str, ...], store: dict | None = None):
        if mode not in ("record", "inject"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode, self.blocks, self.store = mode, tuple(blocks), store
        self.key = f"rf-edit-{mode}({len(self.blocks)} blocks)"

    def begin_run(self, run: SamplingRun) -> dict:
        modules = dict(attention_value_modules(run.transformer))
        missing = [b for b in self.blocks if b not in modules]
        if missing:
            raise ValueError(f"RF-Edit: the model has no attention block(s) {', '.join(missing)}; "
                             "invert and edit with the same model")
        state: dict[str, Any] = {"store": {} if self.mode == "record" else (self.store or {}), "handles": [], "hits": 0}
        for name in self.blocks:
            state["handles"].append(modules[name].register_forward_hook(self._hook(run, state, name)))
        if self.mode == "record":
            run.extras["attention_values"] = state["store"]
        return state

    def end_run(self, run: SamplingRun, state: dict) -> None:
        for handle in state["handles"]:
            handle.remove()
        run.extras["attention_value_hits"] = state["hits"]

    def _hook(self, run: SamplingRun, state: dict, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            key = run.extras.get("value_key")
            if key is None:
                return None
            store = state["store"]
            if self.mode == "record":
                store[(key, name)] = output.detach().clone()
                return None
            recorded = store.get((key, name))
            if recorded is None:
                recorded = store.get(((key[0], 0), name))
            if recorded is None:
                return None
            recorded = recorded.to(output.device, output.dtype)
            if recorded.shape != output.shape:
                n, m = recorded.shape[0], output.shape[0]
                if recorded.shape[1:] != output.shape[1:]:
                    return None
                if n > m and n % m == 0:  # recorded with CFG (negative, positive): keep the positive rows
                    recorded = recorded[-m:]
                elif m % n == 0:  # editing with CFG: the same values for every half
                    recorded = recorded.repeat(m // n, *([1] * (recorded.dim() - 1)))
                else:
                    return None
            state["hits"] += 1
            return recorded

        return hook


# ---------------------------------------------------------------------------------------------
# the ODE loop shared by inversion and editing (steps with nodes/sampling.py's solvers)


def sample_rf_solver_eps(x: torch.Tensor, sigmas: torch.Tensor, fn: Callable, callback: Callable) -> torch.Tensor:
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


def _velocity_pair(x: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> Denoised:
    return Denoised(x - s * v, x + (1 - s) * v)


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
    controller: Callable[[torch.Tensor, float, torch.Tensor, int], torch.Tensor] | None = None,
    value_interval: Callable[[int], int | None] | None = None,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable | None = None,
    seed: int | None = None,
    guidance_options: dict | None = None,
    preview: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Integrate the guided flow ODE along ``sigmas`` (increasing: inversion; decreasing: sampling).

    ``controller(x, s, v, step)`` may replace the guided velocity (RF-Inversion);
    ``value_interval(step)`` names the interval whose attention values are recorded/injected
    (RF-Edit; None: none); ``after_step(step, x)`` may change x after each step (mask blending).
    Returns the final x (float32 on the model's device) and the run's extras.
    """
    if solver not in SAMPLERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r}; expected one of {', '.join(GUIDANCE)}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    steps = len(sigmas) - 1
    device = model.device
    x = x.to(device, torch.float32)
    use_uncond = negative is not None and not (guidance == "cfg" and cfg == 1.0)
    state = GuidanceState()
    options = dict(guidance_options or {})
    renorm = model.info.renorm_guided if model.info.cfg_renorm else None
    progress = progress or current().progress
    step_fn = sample_rf_solver_eps if solver == "rf_solver" and model.info.prediction == "eps" else SAMPLERS[solver]

    previews = Previewer(model, preview)
    with model.sampling_run(sigmas, seed=seed) as run:
        evaluations: dict[int, int] = {}

        def denoise_fn(x_t: torch.Tensor, s: float, i: int) -> Denoised:
            run.step = i
            order = evaluations.get(i, 0)
            evaluations[i] = order + 1
            interval = value_interval(i) if value_interval is not None else None
            run.extras["value_key"] = None if interval is None else (interval, order)
            s_t = torch.full((x_t.shape[0], 1, 1, 1), s, device=device)
            if use_uncond:
                v_u, v_c = model.predict_many(x_t, s, [negative, positive])
            else:
                v_c, v_u = model.predict(x_t, s, positive), None
            d = guide(guidance, x_t, s_t, v_c, v_u, cfg, i, state, options, renorm)
            if controller is not None:
                d = _velocity_pair(x_t, s_t, controller(x_t, s, d.velocity, i))
            return d

        def callback(i: int, x_t: torch.Tensor, d: Denoised) -> None:
            progress(i + 1, steps, previews(i + 1, steps, d.x0))

        if after_step is None:
            x = step_fn(x, sigmas, denoise_fn, callback)
        else:
            for i in range(steps):
                x = step_fn(x, sigmas[i:i + 2], lambda xt, s, _j, i=i: denoise_fn(xt, s, i),
                            lambda _j, xt, d, i=i: callback(i, xt, d))
                x = after_step(i, x)
        run.extras.pop("value_key", None)
        extras = dict(run.extras)
    return x, extras


def _sigmas(model: ModelHandle, scheduler: str, steps: int, shift: float, latent: torch.Tensor,
            strength: float = 1.0) -> torch.Tensor:
    return compute_sigmas(model, scheduler, steps, shift, tuple(latent.shape[-2:]), strength)


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

    x, extras = integrate(handle, x0, up, positive, negative, cfg, guidance=guidance, solver=solver,
                          controller=controller, value_interval=lambda i: i if i in wanted else None,
                          after_step=after_step, progress=progress, seed=seed, preview=preview)
    values = extras.get("attention_values", {}) if stored else {}
    return Inversion(x.float().cpu(), source.float().cpu(), up, trajectory, solver, model.family, values, blocks,
                     stored, batch_index)


def _blend_mask(mask: torch.Tensor | None, like: torch.Tensor, grow_px: int = 0, blur_px: float = 0.0) -> torch.Tensor | None:
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

    m = _blend_mask(mask, inversion.latent)
    m = None if m is None else m.to(device)
    after_step = None
    if m is not None:
        def after_step(j: int, x: torch.Tensor) -> torch.Tensor:
            reference = inversion.trajectory[steps - 1 - j].to(device)
            return m * x + (1 - m) * reference

    x, _ = integrate(handle, inversion.latent, down, positive, negative, cfg, guidance=guidance, solver=solver,
                     controller=controller, value_interval=lambda j: steps - 1 - j if j in inject else None,
                     after_step=after_step, progress=progress, preview=preview)
    return x.float().cpu()


def _stack(first: Any, second: Any, batch: int) -> Any | None:
    """One conditioning of 2*batch rows: ``first`` for rows [0, batch), ``second`` after; None
    when the two cannot be batched (different token counts, extras)."""
    a, b = _expand_cond(first, batch), _expand_cond(second, batch)
    return _cat_conds([a, b]) if _batchable([a, b]) else None


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
    device = model.device
    x_src = source.float().to(device)
    batch = x_src.shape[0]
    z = x_src.clone()
    x_tar = None
    regen_noise = torch.zeros_like(x_src)
    m = _blend_mask(mask, x_src)
    progress = progress or current().progress
    options: dict = {}
    renorm = model.info.renorm_guided if model.info.cfg_renorm else None
    states = (GuidanceState(), GuidanceState())
    uses_uncond = negative is not None and not (guidance == "cfg" and source_cfg == 1.0 and target_cfg == 1.0)
    both = _stack(source_cond, target_cond, batch)
    negatives = _stack(negative, negative, batch) if uses_uncond else None
    start = total - n_max
    previews = Previewer(model, preview)

    def velocities(i: int, s: float, z_src: torch.Tensor | None, z_tar: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Guided source velocity at z_src (None: skip) and target velocity at z_tar."""
        s_t = torch.full((batch, 1, 1, 1), s, device=device)
        if z_src is not None and both is not None and (negatives is not None or not uses_uncond):
            latents = torch.cat([z_src, z_tar])
            if uses_uncond:
                v_u, v_c = model.predict_many(latents, s, [negatives, both])
                vu_s, vu_t = v_u.chunk(2)
            else:
                v_c, vu_s, vu_t = model.predict(latents, s, both), None, None
            vc_s, vc_t = v_c.chunk(2)
        else:
            def one(x: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
                if uses_uncond:
                    vu, vc = model.predict_many(x, s, [negative, cond])
                    return vc, vu
                return model.predict(x, s, cond), None

            vc_s, vu_s = one(z_src, source_cond) if z_src is not None else (None, None)
            vc_t, vu_t = one(z_tar, target_cond)
        v_tar = guide(guidance, z_tar, s_t, vc_t, vu_t, target_cfg, i - start, states[1], options, renorm).velocity
        if z_src is None:
            return None, v_tar
        v_src = guide(guidance, z_src, s_t, vc_s, vu_s, source_cfg, i - start, states[0], options, renorm).velocity
        return v_src, v_tar

    with model.sampling_run(sigmas, seed=seed) as run:
        for i in range(start, total):
            run.step = i
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            if total - i > n_min:
                delta = torch.zeros_like(z)
                for k in range(n_avg):
                    eps = make_noise(tuple(x_src.shape), _noise_seed(seed, i, k), batch_index).to(device)
                    z_src = (1 - s) * x_src + s * eps
                    z_tar = z + z_src - x_src
                    v_src, v_tar = velocities(i, s, z_src, z_tar)
                    delta += (v_tar - v_src) / n_avg
                z = z + (s_next - s) * delta
                if m is not None:
                    z = m * z + (1 - m) * x_src
                shown = z
            else:
                if x_tar is None:
                    eps = make_noise(tuple(x_src.shape), _noise_seed(seed, i, 0), batch_index).to(device)
                    x_tar = z + (1 - s) * x_src + s * eps - x_src
                    regen_noise = eps
                _, v_tar = velocities(i, s, None, x_tar)
                x_tar = x_tar + (s_next - s) * v_tar
                if m is not None:
                    x_tar = m * x_tar + (1 - m) * ((1 - s_next) * x_src + s_next * regen_noise)
                shown = x_tar
            progress(i - start + 1, n_max, previews(i - start + 1, n_max, shown))
    out = z if x_tar is None else x_tar
    return out.float().cpu()


def _noise_seed(seed: int, step: int, draw: int) -> int:
    return (int(seed) * 1_000_003 + step * 1009 + draw) % (2**63)


# ---------------------------------------------------------------------------------------------
# nodes


@node(category="edit", outputs={"latent": LATENT})
def ImageToImage(
    model: MODEL,
    positive: CONDITIONING,
    latent: Link(LATENT, "The encoded input image (VAEEncode)."),
    negative: Link(CONDITIONING, "Unconditional/negative prompt; leave empty for none.", optional=True) = None,
    mask: Link(MASK, "Optional: only the masked area (1) changes; the rest keeps the input.", optional=True) = None,
    seed: Annotated[int, Spec(min=0, max=SEED_MAX, seed=True)] = 0,
    steps: Annotated[int, Spec(min=1, max=1000, tooltip="Steps actually run (of a schedule of steps/strength).")] = 20,
    cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1)] = 4.0,
    strength: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="How much of the input is replaced: 0 keeps it, 1 starts from pure noise.")] = 0.6,
    sampler: Annotated[str, Spec(choices=list(SAMPLERS))] = "euler",
    scheduler: Annotated[str, Spec(choices=SCHEDULERS)] = "auto",
    shift: Annotated[float, Spec(min=0.0, max=100.0, step=0.05, tooltip="0 = the model's default.")] = 0.0,
    guidance: Annotated[str, Spec(choices=GUIDANCE)] = "cfg",
    mask_grow: Annotated[int, Spec(min=0, max=512, tooltip="Grow the mask by this many (image) pixels.")] = 0,
    mask_blur: Annotated[float, Spec(min=0.0, max=256.0, step=0.5, tooltip="Feather the mask edge (pixels).")] = 0.0,
) -> Latent:
    """Image to image (SDEdit): re-noise the input to ``strength`` and denoise it under the prompt;
    with a mask, only the masked area changes (latent blending at every step). Works for every
    family, PixArt included."""
    if strength <= 0:
        return latent
    if mask is not None:
        m = _blend_mask(mask, latent.samples, mask_grow, mask_blur)
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
    seed: Annotated[int, Spec(min=0, max=SEED_MAX, seed=True)] = 0,
    steps: Annotated[int, Spec(min=1, max=1000)] = 28,
    cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1)] = 4.0,
    strength: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="1 = fill the masked area from pure noise.")] = 1.0,
    sampler: Annotated[str, Spec(choices=list(SAMPLERS))] = "euler",
    scheduler: Annotated[str, Spec(choices=SCHEDULERS)] = "auto",
    shift: Annotated[float, Spec(min=0.0, max=100.0, step=0.05)] = 0.0,
    guidance: Annotated[str, Spec(choices=GUIDANCE)] = "cfg",
    mask_grow: Annotated[int, Spec(min=0, max=512, tooltip="Grow the mask by this many (image) pixels.")] = 0,
    mask_blur: Annotated[float, Spec(min=0.0, max=256.0, step=0.5, tooltip="Feather the mask edge (pixels).")] = 0.0,
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
    steps: Annotated[int, Spec(min=1, max=1000)] = 28,
    cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1, tooltip="1 = no guidance (the most exact inversion).")] = 1.0,
    solver: Annotated[str, Spec(choices=SOLVERS, tooltip="rf_solver: 2nd order (2 evaluations per step), far more exact than Euler.")] = "rf_solver",
    scheduler: Annotated[str, Spec(choices=SCHEDULERS)] = "auto",
    shift: Annotated[float, Spec(min=0.0, max=100.0, step=0.05)] = 0.0,
    strength: Annotated[float, Spec(min=0.01, max=1.0, step=0.01, tooltip="How far to invert: 1 = all the way to noise.")] = 1.0,
    gamma: Annotated[float, Spec(min=0.0, max=1.0, step=0.05, tooltip="RF-Inversion: pull towards seeded noise (0 = plain inversion; paper: 0.5).")] = 0.0,
    seed: Annotated[int, Spec(min=0, max=SEED_MAX, seed=True, tooltip="The noise RF-Inversion steers to (gamma > 0).")] = 0,
    store_steps: Annotated[int, Spec(min=0, max=1000, tooltip="RF-Edit: record late-block attention values for the last N steps (= the first N editing steps).")] = 0,
    value_blocks: Annotated[int, Spec(min=0, max=256, tooltip="RF-Edit: how many of the last attention blocks to record (0 = the later half).")] = 0,
    guidance: Annotated[str, Spec(choices=GUIDANCE)] = "cfg",
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
    cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1)] = 1.0,
    solver: Annotated[str, Spec(choices=["same", *SOLVERS], tooltip="same: the inversion's solver.")] = "same",
    inject_steps: Annotated[int, Spec(min=0, max=1000, tooltip="RF-Edit: use the stored attention values for the first N steps.")] = 0,
    eta: Annotated[float, Spec(min=0.0, max=1.0, step=0.05, tooltip="RF-Inversion: pull towards the source image (0 = off; paper: 0.9).")] = 0.0,
    eta_start: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Fraction of the steps where the pull starts.")] = 0.0,
    eta_stop: Annotated[float, Spec(min=0.0, max=1.0, step=0.01, tooltip="Fraction of the steps where the pull stops.")] = 0.25,
    guidance: Annotated[str, Spec(choices=GUIDANCE)] = "cfg",
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
    seed: Annotated[int, Spec(min=0, max=SEED_MAX, seed=True)] = 0,
    steps: Annotated[int, Spec(min=1, max=1000, tooltip="Steps of the full schedule (FlowEdit paper: SD3 50, Flux 28).")] = 28,
    n_max: Annotated[int, Spec(min=1, max=1000, tooltip="Edit over the last n_max steps (more = stronger edits; SD3 33/50, Flux 24/28).")] = 20,
    n_min: Annotated[int, Spec(min=0, max=1000, tooltip="Sample the last n_min steps plainly from the target (0 = none).")] = 0,
    n_avg: Annotated[int, Spec(min=1, max=64, tooltip="Noise draws averaged per step.")] = 1,
    source_cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1)] = 1.5,
    target_cfg: Annotated[float, Spec(min=0.0, max=100.0, step=0.1)] = 5.5,
    scheduler: Annotated[str, Spec(choices=SCHEDULERS)] = "auto",
    shift: Annotated[float, Spec(min=0.0, max=100.0, step=0.05)] = 0.0,
    guidance: Annotated[str, Spec(choices=GUIDANCE)] = "cfg",
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
    grow_pixels: Annotated[int, Spec(min=0, max=512, tooltip="Grow the mask first (covers the decoder's seam).")] = 0,
    feather: Annotated[float, Spec(min=0.0, max=256.0, step=0.5, tooltip="Blend width at the mask edge (pixels).")] = 0.0,
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
