"""Model residency and the MODEL value: a cheap view over a diffusers transformer plus patches.

The MODEL socket carries a :class:`ModelHandle`. It shares the (heavy) transformer module
with every other handle made from it and carries an immutable tuple of *patches* that are
applied only while sampling. Patching nodes (LoRA, cache accelerators, ControlNet, condition
tokens, attention backends) never mutate a handle: ``handle.with_patch(p)`` returns a new view.

Evaluating the model
--------------------
Samplers call exactly one function::

    handle.predict(latents, sigma, cond) -> velocity

``latents`` is (B, C, H, W), or (B, C, F, H, W) for video families, in the family's normalised latent space, ``sigma`` a float or (B,)
tensor in the engine's flow convention (x_s = (1-s) x0 + s noise), ``cond`` a CONDITIONING
(:class:`nodes.text.Conditioning` or anything with ``embeds``/``pooled``/``mask``/``extras``).
It returns the flow-matching velocity v = noise - x0 as float32, whatever the family's native
convention (see app/models/families/). ``handle.predict_many(latents, sigma, [c1, c2])`` evaluates
several conditionings at once (batched when the family's pipeline batches them, as CFG does).
Inside a run, families and patches see each conditioning prepared once for the whole run:
expanded to the batch, batched, on the device (``ModelHandle.prepared_conds``), so no step
copies host tensors in (each such copy would synchronise the GPU).

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

The other values live beside this module and are re-exported here: :class:`VAEHandle`
(app/models/vae.py: ``encode(images) -> latents``, ``decode(latents) -> images`` with the
latent normalisation), :class:`TextEncoders` (app/models/text_encoders.py: (tokenizer, model)
per slot) and the residency helpers (app/models/residency.py). Family conventions (native
kwargs, time convention, latent layout) come from ``handle.info`` (app/models/families/).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from app.models import families
from app.models.families import Family
from app.models.residency import (  # noqa: F401  (re-exported: loaders and nodes import them from here)
    DTYPES,
    Resident,
    apply_block_offload,
    is_group_offloaded,
    module_device,
    resolve_device,
    resolve_dtype,
    same_device,
)
from app.models.text_encoders import TextEncoders  # noqa: F401  (re-exported)
from app.models.vae import VAEHandle, fit_preview_projection  # noqa: F401  (re-exported)

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
    # the conditionings of this run's calls, made ready for the transformer once (ModelHandle.prepared_conds)
    conds: dict = field(default_factory=dict, repr=False)

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
    pipeline: str = ""  # the diffusers pipeline class of its folder (or config folder), from model_index.json
    residency: str = "resident"
    transformer_2: torch.nn.Module | None = None  # Wan 2.2: the low-noise expert (shared like transformer)
    boundary_ratio: float | None = None  # ... used below this fraction of the training timesteps
    preview_vae: Any = field(default=None, repr=False)  # the VAE it came with: fits the preview projection
    cfg_patches: tuple = ()  # how CFG combines (CFGNorm, FreSca: app/models/sampling/guidance.py)
    _sigma_table: torch.Tensor | None = field(default=None, repr=False)
    _active: list = field(default_factory=list, repr=False)  # stack of open SamplingRuns
    _cache: dict = field(default_factory=dict, repr=False)  # small derived tensors (position ids)

    # -- views ---------------------------------------------------------------------------------
    def with_patch(self, patch: Any) -> ModelHandle:
        """A new view with ``patch`` appended; this handle is left unchanged."""
        return replace(self, patches=(*self.patches, patch), _active=[])

    def with_cfg_patch(self, patch: Any) -> ModelHandle:
        """A new view whose CFG combination also applies ``patch`` (app/models/sampling/guidance.py)."""
        return replace(self, cfg_patches=(*self.cfg_patches, patch), _active=[])

    def without_patches(self) -> ModelHandle:
        return replace(self, patches=(), _active=[])

    @property
    def info(self) -> Family:
        return families.get(self.family)

    @property
    def config(self) -> Any:
        return self.transformer.config

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.transformer, self.transformer_2) if m is not None]

    def __repr__(self) -> str:
        patches = ", ".join(getattr(p, "key", type(p).__name__) for p in self.patches)
        return f"ModelHandle({self.family}, {type(self.transformer).__name__}, {self.dtype}, {self.device}, patches=[{patches}])"

    # -- latent layout -------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.info.model_latent_channels(self.config)

    @property
    def patch_size(self) -> int:
        return self.info.patch_size(self.config)

    def image_seq_len(self, *dims: int) -> int:
        """Tokens for a latent of (height, width) or (frames, height, width): what dynamic shift is computed from."""
        return self.info.seq_len(self.config, tuple(dims))

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
        if self.info.discrete_time:
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
        prepared = self.prepared_conds(run, conds, batch)
        if len(prepared) < len(conds):  # batched into one call (CFG)
            n = len(conds)
            out = self._evaluate(latents.repeat(n, *[1] * (latents.dim() - 1)), sigma_t.repeat(n), sigma_host.repeat(n),
                                 prepared[0], run)
            return list(out.chunk(n))
        return [self._evaluate(latents, sigma_t, sigma_host, c, run) for c in prepared]

    def prepared_conds(self, run: SamplingRun, conds: Sequence[Any], batch: int) -> list[Any]:
        """``conds`` expanded to ``batch`` and on the device (embeds and pooled in the handle's
        dtype, as :meth:`cond_tensors` gives them): one merged conditioning where the family batches
        them (CFG), else one each. Made once per run and reused by every step: a copy from host
        memory synchronises the GPU, so one per step left it idle while the host prepared each call."""
        key = (batch, *map(id, conds))
        if key not in run.conds:
            if len(run.conds) >= PREPARED_PER_RUN:  # callers that make new conditionings every step
                run.conds.pop(next(iter(run.conds)))
            expanded = [expand_cond(c, batch) for c in conds]
            if len(expanded) > 1 and self.info.batch_cfg and batchable(expanded):
                expanded = [cat_conds(expanded)]
            moved: dict[tuple, torch.Tensor] = {}  # a tensor two conditionings share is copied once
            # the inputs are kept with their prepared forms, so their ids stay theirs during the run
            run.conds[key] = (tuple(conds), [self._on_device(c, moved) for c in expanded])
        return run.conds[key][1]

    def _on_device(self, cond: Any, moved: dict[tuple, torch.Tensor]) -> Any:
        """``cond`` with its tensors on the device (embeds and pooled also in the handle's dtype),
        extras' tensors too (in their own dtype), for the family's model call."""
        def move(value: Any, dtype: torch.dtype | None = None) -> Any:
            if isinstance(value, (tuple, list)):
                return type(value)(move(v) for v in value)
            if not isinstance(value, torch.Tensor):
                return value
            key = (id(value), dtype or value.dtype)
            if key not in moved:
                moved[key] = value.to(self.device, key[1])
            return moved[key]

        fields = {"embeds": move(cond.embeds, self.dtype)}
        for name, dtype in (("pooled", self.dtype), ("mask", None)):
            if getattr(cond, name, None) is not None:
                fields[name] = move(getattr(cond, name), dtype)
        if getattr(cond, "extras", None):
            fields["extras"] = {k: move(v) for k, v in cond.extras.items()}
        return replace(cond, **fields)

    def _evaluate(self, latents: torch.Tensor, sigma: torch.Tensor, sigma_host: torch.Tensor, cond: Any,
                  run: SamplingRun) -> torch.Tensor:
        kwargs = self._native_kwargs(latents, sigma, sigma_host, cond)
        call = ModelCall(kwargs, latents, sigma, cond, run, self.family, sigma_host=sigma_host)
        transformer = self.info.pick_transformer(self, sigma_host)

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
        fam = self.info
        return fam.native_kwargs(self, fam.model_input(x, sigma), fam.timestep(self, sigma, sigma_host), cond)

    def cond_tensors(self, cond: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A conditioning's (embeds, pooled, mask) on this handle's device (embeds/pooled in its dtype)."""
        embeds = cond.embeds.to(self.device, self.dtype)
        mask = None if getattr(cond, "mask", None) is None else cond.mask.to(self.device)
        pooled = None if getattr(cond, "pooled", None) is None else cond.pooled.to(self.device, self.dtype)
        return embeds, pooled, mask

    def cached(self, key: Any, build: Callable[[], torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """A small derived tensor (position ids) built once per key, device and dtype (default:
        the handle's)."""
        dtype = dtype or self.dtype
        full = (key, self.device, dtype)
        if full not in self._cache:
            self._cache[full] = build().to(self.device, dtype)
        return self._cache[full]

    def timesteps_for(self, sigma_host: torch.Tensor) -> torch.Tensor:
        """Eps families: training timesteps for host-side sigmas, put on the device with a fill
        kernel when all items share one value (no host->device copy, so no synchronisation)."""
        t = self.sigma_to_timestep(sigma_host).float()
        if bool((t == t[0]).all()):
            return torch.full((sigma_host.shape[0],), float(t[0]), device=self.device)
        return t.to(self.device)

    def _to_velocity(self, out: torch.Tensor, call: ModelCall) -> torch.Tensor:
        v = self.info.to_velocity(out, call.latents, call.sigma, self.config)
        return self.info.constrain_velocity(v, call.latents, call.sigma, call.cond)


PREPARED_PER_RUN = 8  # prepared conditionings a run keeps (samplers use one or two sets)


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
        extras, first_extras = c.extras or {}, first.extras or {}
        if extras.keys() != first_extras.keys() or not all(_same(extras[k], first_extras[k]) for k in extras):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    """Equal conditioning extras; tensors (reference latents, also inside tuples) only when they are
    the same tensor: comparing two would compare element by element."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def cat_conds(conds: Sequence[Any]) -> Any:
    first = conds[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(c, name) for c in conds]
        return None if values[0] is None else torch.cat(values)

    return replace(first, embeds=cat("embeds"), pooled=cat("pooled"), mask=cat("mask"))
