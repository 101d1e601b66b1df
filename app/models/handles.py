"""Model residency and the MODEL value: a cheap view over a diffusers transformer plus patches.

The MODEL socket carries a :class:`ModelHandle`. It shares the (heavy) transformer module
with every other handle made from it and carries an immutable tuple of *patches* that are
applied only while sampling. Patching nodes (LoRA, cache accelerators, ControlNet, condition
tokens, attention backends) never mutate a handle: ``handle.with_patch(p)`` returns a new view.

Evaluating the model
--------------------
Samplers call exactly one function::

    handle.predict(latents, sigma, cond) -> velocity

``latents`` is (B, C, H, W) in the family's normalised latent space, ``sigma`` a float or (B,)
tensor in the engine's flow convention (x_s = (1-s) x0 + s noise), ``cond`` a CONDITIONING
(:class:`nodes.text.Conditioning` or anything with ``embeds``/``pooled``/``mask``/``extras``).
It returns the flow-matching velocity v = noise - x0 as float32, whatever the family's native
convention (see app/models/families/). ``handle.predict_many(latents, sigma, [c1, c2])`` evaluates
several conditionings at once (batched when the family's pipeline batches them, as CFG does).

Sampling runs and per-run state
-------------------------------
A sampler wraps its loop in ``with handle.sampling_run(sigmas, seed=...) as run:``. Entering
calls every patch's ``begin_run(run)`` and keeps what it returns as that patch's *per-run
state*; leaving calls ``end_run(run, state)``. A memoized MODEL therefore never replays state
from an earlier run. ``predict`` outside a run opens a one-call run. ``run.step`` is the index
of the current step (the sampler sets it), ``run.sigmas`` the whole schedule.

Patch protocol (subclass :class:`ModelPatch`; every method is optional)::

    class ModelPatch:
        key: str                                    # identity shown in the UI / errors
        def begin_run(self, run: SamplingRun) -> Any          # fresh per-run state; install hooks here
        def end_run(self, run: SamplingRun, state: Any) -> None  # undo what begin_run installed
        def wrap(self, state: Any, call: ModelCall,
                 forward: Callable[[ModelCall], Tensor]) -> Tensor  # around one transformer call

``ModelCall`` holds the native inputs of one transformer call: ``kwargs`` (exactly what is
passed to ``transformer(**kwargs, return_dict=False)``, e.g. hidden_states, timestep,
encoder_hidden_states; a ControlNet patch adds ``block_controlnet_hidden_states``), plus
``latents``/``sigma`` (engine convention, on the device), ``sigma_host`` (the same sigmas on
CPU: read these rather than calling ``.item()``, which would synchronise the GPU every call),
``cond``, ``run`` and ``family``. ``wrap`` may edit
``call.kwargs`` and call ``forward(call)``, or return a cached output without calling it
(cache accelerators); its return value is the transformer's native output. Patches are
applied in list order, the first patch outermost. Block-level hooks (diffusers
``HookRegistry``) are installed in ``begin_run`` on ``run.transformer`` and removed in
``end_run``.

Residency
---------
Handles load on the device they were created for (auto: CUDA in bf16, else CPU fp32).
The memo cache may call ``offload()`` (move weights to CPU) under VRAM pressure; ``predict``
moves them back before the next call (``ensure_device``). ``residency`` per value:
"resident" (stay on the device), "offload" (RAM between uses: moved in for each sampling
run / encode / decode, out after), or group-offloaded modules (CheckpointLoader
``offload=blocks``: diffusers streams them block by block; never moved whole).

Other values here: :class:`VAEHandle` (the VAE value: ``encode(images) -> latents``,
``decode(latents) -> images`` with the family's latent normalisation) and
:class:`TextEncoders` (the TEXT_ENCODER value: (tokenizer, model) per slot).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from app.models import families
from app.models.families import Family

# ---------------------------------------------------------------------------------------------
# devices and dtypes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(choice: str, default: torch.device | None = None) -> torch.device:
    """"auto" -> the engine's device (CUDA when there is one), else the named device."""
    if choice in ("auto", "", None):
        if default is not None:
            return torch.device(default)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} requested but CUDA is not available on this machine")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere."""
    if choice in ("auto", "", None):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[choice]
    except KeyError:
        raise ValueError(f"unknown dtype {choice!r}; expected auto, {', '.join(DTYPES)}") from None


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device (when 0 is the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


GROUP_OFFLOAD_FLAG = "_ditgraph_group_offload"


def is_group_offloaded(module: torch.nn.Module) -> bool:
    """Weights managed block by block by diffusers' group-offloading hooks (never moved whole)."""
    return bool(getattr(module, GROUP_OFFLOAD_FLAG, False))


def apply_block_offload(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Keep ``module``'s weights in RAM and stream them to ``device`` one block at a time
    (diffusers group offloading; overlapping copies on a CUDA stream). For models larger
    than the GPU: slower, but only one block is resident at a time."""
    from diffusers.hooks import apply_group_offloading

    module.to("cpu")
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1,
                           use_stream=device.type == "cuda")
    setattr(module, GROUP_OFFLOAD_FLAG, True)
    return module


class Resident:
    """Mixin for values wrapping modules: ``offload()`` to CPU, ``ensure_device()`` back.

    ``residency`` "resident" keeps the weights on ``device``; "offload" keeps them in RAM and
    moves them to ``device`` only while they run (``release()`` after each use); "blocks"
    streams them block by block (:func:`apply_block_offload`).
    """

    device: torch.device
    residency: str

    def _modules(self) -> list[torch.nn.Module]:
        return []

    def release(self) -> None:
        """Called after each use: offloads when the residency policy says so."""
        if getattr(self, "residency", "resident") == "offload":
            self.offload()

    def offload(self) -> None:
        for m in self._modules():
            if module_device(m).type != "cpu" and not is_group_offloaded(m):
                m.to("cpu")

    def ensure_device(self) -> None:
        for m in self._modules():
            if not is_group_offloaded(m) and not same_device(module_device(m), self.device):
                m.to(self.device)


# ---------------------------------------------------------------------------------------------
# patches and runs


class ModelPatch:
    """Base class of model patches; override what you need (see module docstring)."""

    key: str = "patch"

    def begin_run(self, run: SamplingRun) -> Any:
        return None

    def end_run(self, run: SamplingRun, state: Any) -> None:
        return None

    def wrap(self, state: Any, call: ModelCall, forward: Callable[[ModelCall], torch.Tensor]) -> torch.Tensor:
        return forward(call)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key})"


@dataclass
class SamplingRun:
    """One sampling run of one handle: the schedule, the step counter, each patch's state."""

    handle: ModelHandle
    sigmas: torch.Tensor | None = None
    seed: int | None = None
    step: int = 0
    calls: int = 0
    states: list[Any] = field(default_factory=list)
    extras: dict = field(default_factory=dict)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.handle.transformer

    @property
    def total_steps(self) -> int:
        return 0 if self.sigmas is None else len(self.sigmas) - 1


@dataclass
class ModelCall:
    """The native inputs of one transformer call (what patches see and may edit)."""

    kwargs: dict
    latents: torch.Tensor  # engine convention, (B, C, H, W) float32
    sigma: torch.Tensor  # (B,) float32
    cond: Any
    run: SamplingRun
    family: str
    extras: dict = field(default_factory=dict)
    sigma_host: torch.Tensor | None = None  # the same sigmas on CPU (read these, not .item(): no sync)


# ---------------------------------------------------------------------------------------------
# the MODEL value


@dataclass(eq=False)
class ModelHandle(Resident):
    """A diffusion transformer (shared) + family conventions + patches applied at sampling time."""

    transformer: torch.nn.Module
    family: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    patches: tuple = ()
    scheduler_config: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # manifest defaults (steps, cfg, shift, width, height)
    source: str = ""
    residency: str = "resident"
    preview_vae: Any = field(default=None, repr=False)  # the VAE it came with: fits the preview projection
    _sigma_table: torch.Tensor | None = field(default=None, repr=False)
    _active: list = field(default_factory=list, repr=False)  # stack of open SamplingRuns
    _cache: dict = field(default_factory=dict, repr=False)  # small derived tensors (position ids)

    # -- views ---------------------------------------------------------------------------------
    def with_patch(self, patch: Any) -> ModelHandle:
        """A new view with ``patch`` appended; this handle is left unchanged."""
        return replace(self, patches=(*self.patches, patch), _active=[])

    def without_patches(self) -> ModelHandle:
        return replace(self, patches=(), _active=[])

    @property
    def info(self) -> Family:
        return families.get(self.family)

    @property
    def config(self) -> Any:
        return self.transformer.config

    def _modules(self) -> list[torch.nn.Module]:
        return [self.transformer]

    def __repr__(self) -> str:
        patches = ", ".join(getattr(p, "key", type(p).__name__) for p in self.patches)
        return f"ModelHandle({self.family}, {type(self.transformer).__name__}, {self.dtype}, {self.device}, patches=[{patches}])"

    # -- latent layout -------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        c = self.config
        if self.family == "flux":
            return c.in_channels // 4
        return c.in_channels

    @property
    def patch_size(self) -> int:
        return 2 if self.family == "flux" else int(getattr(self.config, "patch_size", 1) or 1)

    def image_seq_len(self, height: int, width: int) -> int:
        """Image tokens for a latent of (height, width): what dynamic shift is computed from."""
        p = self.patch_size
        return (height // p) * (width // p)

    # -- previews ----------------------------------------------------------------------------------
    def preview_projection(self) -> torch.Tensor | None:
        """A (C+1, 3) affine latent->RGB map fitted once from ``preview_vae`` (None without one)."""
        if "preview" not in self._cache:
            fitted = None
            if self.preview_vae is not None:
                try:
                    fitted = fit_preview_projection(self.preview_vae)
                except Exception:  # a preview must never fail a run
                    fitted = None
            self._cache["preview"] = fitted
        return self._cache["preview"]

    # -- sigma range -----------------------------------------------------------------------------
    def sigma_table(self) -> torch.Tensor:
        """Discrete-time (eps) families: the VE sigma of each training timestep (increasing)."""
        if self._sigma_table is None:
            c = self.scheduler_config
            n = int(c.get("num_train_timesteps", 1000))
            start, end = float(c.get("beta_start", 0.0001)), float(c.get("beta_end", 0.02))
            schedule = c.get("beta_schedule", "linear")
            if schedule == "scaled_linear":
                betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
            elif schedule == "linear":
                betas = torch.linspace(start, end, n, dtype=torch.float64)
            else:
                raise ValueError(f"{self.source}: unsupported beta_schedule {schedule!r} for an eps model")
            alphas_cumprod = torch.cumprod(1.0 - betas, 0)
            self._sigma_table = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return self._sigma_table

    @property
    def sigma_max(self) -> float:
        """The largest flow sigma the model was trained on (1 for flow models)."""
        if self.info.prediction == "eps":
            ve = float(self.sigma_table()[-1])
            return ve / (1 + ve)
        return 1.0

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Eps families: flow sigma -> fractional training timestep (inverse of the linear
        interpolation diffusers' discrete schedulers use)."""
        table = self.sigma_table()
        ve = (sigma.double() / (1 - sigma.double()).clamp(min=1e-12)).cpu()
        # np.interp(ve, table, arange) without numpy
        idx = torch.searchsorted(table, ve).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        frac = ((ve - lo) / (hi - lo)).clamp(0, 1)
        t = (idx - 1).double() + frac
        t = torch.where(ve <= table[0], torch.zeros_like(t), t)
        t = torch.where(ve >= table[-1], torch.full_like(t, len(table) - 1), t)
        return t

    # -- sampling runs -------------------------------------------------------------------------
    @contextlib.contextmanager
    def sampling_run(self, sigmas: torch.Tensor | None = None, seed: int | None = None, **extras: Any) -> Iterator[SamplingRun]:
        """Open a run: fresh per-run state for every patch, closed (end_run) on exit."""
        run = SamplingRun(self, sigmas, seed, extras=dict(extras))
        started: list[tuple[Any, Any]] = []
        self.ensure_device()
        try:
            for patch in self.patches:
                begin = getattr(patch, "begin_run", None)
                state = begin(run) if begin else None
                run.states.append(state)
                started.append((patch, state))
            self._active.append(run)
            yield run
        finally:
            if self._active and self._active[-1] is run:
                self._active.pop()
            for patch, state in reversed(started):
                end = getattr(patch, "end_run", None)
                if end:
                    end(run, state)
            if not self._active:
                self.release()

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, latents: torch.Tensor, sigma: float | torch.Tensor, cond: Any) -> torch.Tensor:
        """Flow velocity v = noise - x0 at (latents, sigma) under ``cond`` (float32)."""
        return self.predict_many(latents, sigma, [cond])[0]

    @torch.no_grad()
    def predict_many(self, latents: torch.Tensor, sigma: float | torch.Tensor, conds: Sequence[Any]) -> list[torch.Tensor]:
        """Velocities for several conditionings; one batched call when the family allows it."""
        if not self._active:
            with self.sampling_run():
                return self.predict_many(latents, sigma, conds)
        run = self._active[-1]
        batch = latents.shape[0]
        latents = latents.to(self.device, torch.float32)
        if isinstance(sigma, torch.Tensor):
            sigma_t = sigma.to(self.device, torch.float32).reshape(-1)
            sigma_t = sigma_t.expand(batch) if sigma_t.numel() == 1 else sigma_t
            sigma_host = sigma_t.detach().cpu()
        else:  # a fill kernel, not a host->device copy (which would synchronise every step)
            sigma_t = torch.full((batch,), float(sigma), device=self.device)
            sigma_host = torch.full((batch,), float(sigma))
        conds = [expand_cond(c, batch) for c in conds]
        if len(conds) > 1 and self.info.batch_cfg and batchable(conds):
            merged = cat_conds(conds)
            n = len(conds)
            out = self._evaluate(latents.repeat(n, 1, 1, 1), sigma_t.repeat(n), sigma_host.repeat(n), merged, run)
            return list(out.chunk(n))
        return [self._evaluate(latents, sigma_t, sigma_host, c, run) for c in conds]

    def _evaluate(self, latents: torch.Tensor, sigma: torch.Tensor, sigma_host: torch.Tensor, cond: Any,
                  run: SamplingRun) -> torch.Tensor:
        kwargs = self._native_kwargs(latents, sigma, sigma_host, cond)
        call = ModelCall(kwargs, latents, sigma, cond, run, self.family, sigma_host=sigma_host)
        transformer = self.transformer

        def base(c: ModelCall) -> torch.Tensor:
            return transformer(**c.kwargs, return_dict=False)[0]

        forward = base
        for patch, state in reversed(list(zip(self.patches, run.states, strict=True))):
            wrap = getattr(patch, "wrap", None)
            if wrap is not None:
                forward = _bind(wrap, state, forward)
        run.calls += 1
        out = forward(call)
        return self._to_velocity(out, call)

    def _native_kwargs(self, x: torch.Tensor, sigma: torch.Tensor, sigma_host: torch.Tensor, cond: Any) -> dict:
        dtype = self.dtype
        fam = self.info
        embeds = cond.embeds.to(self.device, dtype)
        mask = None if getattr(cond, "mask", None) is None else cond.mask.to(self.device)
        pooled = None if getattr(cond, "pooled", None) is None else cond.pooled.to(self.device, dtype)
        if fam.prediction == "eps":
            ve = sigma / (1 - sigma).clamp(min=1e-12)
            x_in = x / (1 - sigma).clamp(min=1e-12)[:, None, None, None]  # VE-space sample
            x_in = x_in / (ve**2 + 1).sqrt()[:, None, None, None]  # diffusers' scale_model_input
            t = self._timesteps_for(sigma_host)
        else:
            x_in = x
        if self.family in ("sd3", "shapes-dit"):  # timesteps stay float32, as the pipelines pass them
            return {"hidden_states": x_in.to(dtype), "timestep": sigma * 1000,
                    "encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.family == "flux":
            b, c, h, w = x.shape
            packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
            img_ids = self._image_ids(h // 2, w // 2)
            txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=dtype)
            guidance = None
            if getattr(self.config, "guidance_embeds", False):
                value = cond.extras.get("guidance") if getattr(cond, "extras", None) else None
                value = fam.distilled_guidance if value is None else value
                guidance = torch.full((b,), float(value), device=self.device, dtype=torch.float32)
            return {"hidden_states": packed.to(dtype), "timestep": sigma.to(dtype), "guidance": guidance,
                    "pooled_projections": pooled, "encoder_hidden_states": embeds, "txt_ids": txt_ids,
                    "img_ids": img_ids}
        if self.family == "pixart":
            return {"hidden_states": x_in.to(dtype), "encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                    "timestep": t, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        if self.family == "sana":
            scale = float(getattr(self.config, "timestep_scale", 1.0) or 1.0)
            return {"hidden_states": x_in.to(dtype), "encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                    "timestep": sigma * 1000 * scale}
        if self.family == "lumina2":
            return {"hidden_states": x_in.to(dtype), "timestep": 1 - sigma, "encoder_hidden_states": embeds,
                    "encoder_attention_mask": mask}
        raise ValueError(f"no model call for family {self.family!r}")

    def _image_ids(self, h: int, w: int) -> torch.Tensor:
        """Flux position ids of an h x w token grid (cached: built once per size and device)."""
        key = ("img_ids", h, w, self.device, self.dtype)
        if key not in self._cache:
            ids = torch.zeros(h, w, 3)
            ids[..., 1] += torch.arange(h)[:, None]
            ids[..., 2] += torch.arange(w)[None, :]
            self._cache[key] = ids.reshape(-1, 3).to(self.device, self.dtype)
        return self._cache[key]

    def _timesteps_for(self, sigma_host: torch.Tensor) -> torch.Tensor:
        """Eps families: training timesteps for host-side sigmas, put on the device with a fill
        kernel when all items share one value (no host->device copy, so no synchronisation)."""
        t = self.sigma_to_timestep(sigma_host).float()
        if bool((t == t[0]).all()):
            return torch.full((sigma_host.shape[0],), float(t[0]), device=self.device)
        return t.to(self.device)

    def _to_velocity(self, out: torch.Tensor, call: ModelCall) -> torch.Tensor:
        out = out.float()
        x, sigma = call.latents, call.sigma
        fam = self.info
        if self.family == "flux":
            b, c, h, w = x.shape
            out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma (PixArt, Sana variants): keep the mean
            out = out[:, : x.shape[1]]
        if fam.prediction == "flow":
            return out
        if fam.prediction == "flow_reversed":
            return -out
        # eps: x0 = x_ve - ve * eps; v = eps - x0
        s = sigma[:, None, None, None]
        ve = s / (1 - s).clamp(min=1e-12)
        x_ve = x / (1 - s).clamp(min=1e-12)
        x0 = x_ve - ve * out
        return out - x0


def _bind(wrap: Callable, state: Any, forward: Callable) -> Callable:
    return lambda call: wrap(state, call, forward)


# ---------------------------------------------------------------------------------------------
# conditioning batching helpers (duck-typed so app/ does not import nodes/)


def expand_cond(cond: Any, batch: int) -> Any:
    n = cond.embeds.shape[0]
    if n == batch:
        return cond
    if batch % n:
        raise ValueError(f"conditioning has {n} prompts but the latent batch is {batch}; "
                         "use one prompt or as many prompts as latents")
    reps = batch // n

    def rep(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat_interleave(reps, dim=0)

    return replace(cond, embeds=rep(cond.embeds), pooled=rep(cond.pooled), mask=rep(cond.mask))


def batchable(conds: Sequence[Any]) -> bool:
    first = conds[0]
    for c in conds[1:]:
        if c.embeds.shape[1:] != first.embeds.shape[1:]:
            return False
        if (c.pooled is None) != (first.pooled is None) or (c.mask is None) != (first.mask is None):
            return False
        if (c.extras or {}) != (first.extras or {}):
            return False
    return True


def cat_conds(conds: Sequence[Any]) -> Any:
    first = conds[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(c, name) for c in conds]
        return None if values[0] is None else torch.cat(values)

    return replace(first, embeds=cat("embeds"), pooled=cat("pooled"), mask=cat("mask"))


# ---------------------------------------------------------------------------------------------
# VAE and text encoders


@dataclass(eq=False)
class VAEHandle(Resident):
    """A VAE with its latent normalisation: z = (mean - shift) * scale (SD3/Flux style;
    shift 0 for PixArt/Sana)."""

    vae: torch.nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    source: str = ""
    residency: str = "resident"

    def _modules(self) -> list[torch.nn.Module]:
        return [self.vae]

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", 0.0) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def factor(self) -> int:
        c = self.vae.config
        if hasattr(c, "encoder_block_out_channels"):  # AutoencoderDC
            return 2 ** (len(c.encoder_block_out_channels) - 1)
        return 2 ** (len(c.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> normalised latents (B, C, h, w) float32 (posterior mean)."""
        self.ensure_device()
        x = images.permute(0, 3, 1, 2).to(self.device, self.dtype) * 2 - 1
        try:
            out = self.vae.encode(x)
            latent = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent
            return ((latent.float() - self.shift_factor) * self.scaling_factor).cpu()
        finally:
            self.release()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Normalised latents -> (B, H, W, 3) float in [0, 1] on CPU."""
        self.ensure_device()
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        z = z.to(self.dtype)
        try:
            if tiled and hasattr(self.vae, "tiled_decode"):
                image = self.vae.tiled_decode(z, return_dict=False)[0]
            else:
                image = self.vae.decode(z, return_dict=False)[0]
            return ((image.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()
        finally:
            self.release()


@dataclass(eq=False)
class TextEncoders(Resident):
    """The TEXT_ENCODER value: text encoders by slot ("clip_l", "clip_g", "t5", "gemma",
    "minilm"), each a (tokenizer, model) pair, plus the family they were loaded for (if known)."""

    slots: dict[str, tuple[Any, torch.nn.Module]]
    family: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)  # e.g. shapes-dit max_length
    source: str = ""
    residency: str = "resident"

    def _modules(self) -> list[torch.nn.Module]:
        return [model for _, model in self.slots.values()]

    def merged(self, other: TextEncoders) -> TextEncoders:
        return replace(self, slots={**self.slots, **other.slots}, family=self.family or other.family,
                       options={**other.options, **self.options})

    def guess_family(self) -> str | None:
        if self.family:
            return self.family
        names = set(self.slots)
        for fam in ("sd3", "flux", "pixart", "shapes-dit"):
            if names == set(families.get(fam).text_slots):
                return fam
        if {"clip_l", "clip_g"} <= names:
            return "sd3"
        if names == {"gemma"}:
            return None  # Sana or Lumina 2: the encode node must be told
        return None


ANCHOR_COLOURS = [(1, 1, 1), (0, 0, 0), (0.5, 0.5, 0.5), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1),
                  (1, 0, 1), (0.9, 0.9, 0.9), (0.2, 0.2, 0.2), (1, 0.5, 0)]


@torch.no_grad()
def fit_preview_projection(vae: VAEHandle, blocks: int = 6, seed: int = 0) -> torch.Tensor:
    """Least-squares affine map from normalised latents to RGB: encode one image of solid-colour
    blocks (anchors such as white, black and the primaries, then random colours) and pair each
    latent pixel inside a block with the block's colour. Approximate (latents also code texture),
    but good enough to see composition and colours while sampling."""
    f = vae.factor
    cell = 4  # latent pixels per block side; the outer ring is dropped (edges mix colours)
    size = cell * f
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(blocks * blocks, 3, generator=g)
    colours[: len(ANCHOR_COLOURS)] = torch.tensor(ANCHOR_COLOURS, dtype=torch.float32)
    colours = colours.reshape(blocks, blocks, 3)
    image = colours.repeat_interleave(size, 0).repeat_interleave(size, 1)[None]
    latent = vae.encode(image)[0]
    c = latent.shape[0]
    inner = latent.reshape(c, blocks, cell, blocks, cell)[:, :, 1:-1, :, 1:-1]
    z = inner.permute(1, 3, 2, 4, 0).reshape(blocks, blocks, -1, c)
    targets = colours[:, :, None, :].expand(blocks, blocks, z.shape[2], 3).reshape(-1, 3)
    design = torch.cat([z.reshape(-1, c), torch.ones(targets.shape[0], 1)], dim=1)
    ridge = 1e-3 * torch.eye(c + 1)
    return torch.linalg.solve(design.T @ design + ridge, design.T @ targets)
